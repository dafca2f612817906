"""Does this model keep packed rows apart? Asked of the model itself, before the first packed batch.

Packed batches (``worker.batching``) pass no attention mask, only ``position_ids`` that start again at 0 for each
row. Most architectures in transformers 5 (llama, qwen, mistral, gemma, phi, gpt2, ...) build a block-diagonal
causal mask from those, so no row sees another. Some do not: OPT attends across rows and keeps counting
positions, and so do Bloom's ALiBi and, before transformers 5.24, Falcon (measured). Training on such packed
batches would teach each row from text that is not its own, silently. So one forward pass of three short packed
sequences asks the model:

* ``[A, C]`` and ``[B, C]``: if C's logits differ, C saw what came before it (a leak);
* ``[A, C]`` and ``[C, A]``: if C's logits differ, C's positions did not start again at 0.

Identical rows in one batch take the same kernels, so a model that keeps rows apart gives the same C logits to
within rounding; the tolerances are fractions of the logits' own spread, so they hold in bf16 and 4-bit.
"""

from __future__ import annotations

import torch

from worker.loop import evaluating

DOC = 16  # tokens per probe document: short, so the probe costs less than one training step
LEAK_TOL = 1e-2  # same kernels, same shapes: any real leak is far above this (measured 4e-2 to 1.4 on tiny models)
MOVED_TOL = 1e-1  # C at another offset in its row: rounding in bf16 can reach a few percent of the spread


def packing_problem(model: torch.nn.Module) -> str | None:
    """None when packed rows do not see each other in ``model``; otherwise why packing must not be used."""
    embeddings = model.get_input_embeddings()
    vocab, device = embeddings.num_embeddings, embeddings.weight.device
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, vocab, (DOC,), generator=g) for _ in range(3))
    ids = torch.stack([torch.cat([a, c]), torch.cat([b, c]), torch.cat([c, a])]).to(device)
    positions = torch.arange(DOC).repeat(2).expand(3, -1).to(device)
    with evaluating(model):
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
    c_after_a = logits[0, DOC:]
    scale = float(c_after_a.std()) or 1.0
    leak = float((c_after_a - logits[1, DOC:]).abs().max()) / scale
    moved = float((c_after_a - logits[2, :DOC]).abs().max()) / scale
    name = type(model).__name__
    if leak > LEAK_TOL:
        return (f"{name} lets a packed row attend to the rows before it (logits moved {leak:.2g} of their spread "
                f"when an earlier row changed)")
    if moved > MOVED_TOL:
        return (f"{name} does not restart positions for each packed row (logits moved {moved:.2g} of their spread "
                "with the row's offset)")
    return None
