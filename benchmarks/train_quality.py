"""Training quality: the worker's trainer against the tuned Hugging Face Trainer on the same real text, the same
training rows and the same number of tokens. Speed must not come from training on less: after the same passes,
the worker's eval loss must be within 2% of the Trainer's (lower is fine). Exit 0 PASS, 1 FAIL, 2 INCONCLUSIVE: the
Trainer's adapter must beat the base by at least 4%, else an adapter that learned nothing would pass too.

    .venv/bin/python benchmarks/train_quality.py [--shape small|qwen3-0.6b] [--device auto|cpu|cuda]
        [--epochs 3] [--hf-batch 16] [--hf-accum 2] [--lr 3e-3] [--dropout 0] [--pretrain-steps 150]
        [--cache DIR] [--json FILE]

The text is real: the docstrings of this Python's standard library, read with ``ast`` (nothing is imported or
downloaded), grouped per source file into rows of instruction-like lengths. Half of the files pretrain the random
base briefly (all weights), so that LoRA starts from a model that already knows something of the language, as it
does in use; the other half is the fine-tuning dataset. A BPE tokenizer is trained on all of it.

Recipes, each on the rows the worker's own split gives (``worker.data.load_splits``: refinement, the seeded
eval split, truncation), so they see exactly the same training and eval rows:

* worker (packed): ``run_training`` as the worker calls it, rows packed into ``max_length`` sequences; its batch
  is chosen so a step holds about as many tokens as the Trainer's;
* worker (padded): the same, length-grouped padded rows, ``hf-batch`` x ``hf-accum`` rows a step;
* tuned: the HF Trainer, dynamic padding, batch ``hf-batch`` x ``hf-accum``, bf16 on cuda, linear decay.

All use LoRA r=16 on all linear layers, alpha 32, no dropout (``--dropout``), the same learning rate, the same
epochs. Every adapter is then scored by one function here (base + adapter loaded fresh, fp32, mean loss per
labelled eval token), so the comparison does not rest on either trainer's own evaluation. The worker's own "eval
after" is shown beside it.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _shapes  # noqa: E402 - benchmarks/ is on sys.path when this runs as a script

TOLERANCE = 0.02  # the worker's eval loss may be at most this fraction above the Trainer's
MIN_GAIN = 2 * TOLERANCE  # the Trainer must beat the base by this much: a do-nothing adapter then fails
MAX_LENGTH = 512
VOCAB = 8192
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "dist-packages"}
DONE = "complete"
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]

SHAPES: dict[str, dict[str, Any]] = {
    # CPU-sized: trains a pass over the dataset in minutes on two cores.
    "small": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                  tie_word_embeddings=False),
    # The throughput benchmark's shape (the anchor's), with this tokenizer's vocabulary.
    "qwen3-0.6b": {k: v for k, v in _shapes.SHAPES["qwen3-0.6b"].config.items() if k != "vocab_size"},
}


@dataclass
class Row:
    recipe: str
    eval_loss: float | None = None  # scored here, the same way for every recipe
    own_eval_loss: float | None = None  # the trainer's own report, where it makes one
    tokens: int | None = None  # labelled tokens trained on
    steps: int | None = None
    tokens_per_step: int | None = None
    seconds: float | None = None
    note: str = ""
    error: str | None = None


# ── the text ─────────────────────────────────────────────────────────────────────────────────────────────
def docstrings(path: Path) -> list[str]:
    """Every module, class and function docstring of one source file that is prose-sized (over 80 chars)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds))
    return [inspect.cleandoc(d) for d in docs if d and len(d) > 80]


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
    return [p for p in files if not SKIP_DIRS & set(p.relative_to(root).parts)]


def rows_of(docs: list[str], rng: random.Random) -> list[str]:
    """One file's docstrings joined into rows of lognormal length (median ~700 characters, ~180 tokens)."""
    rows, current = [], ""
    target = _target(rng)
    for doc in docs:
        current = f"{current}\n\n{doc}" if current else doc
        if len(current) >= target:
            rows.append(current)
            current, target = "", _target(rng)
    return rows + ([current] if current else [])


def _target(rng: random.Random) -> int:
    return max(100, min(2000, int(rng.lognormvariate(math.log(700), 0.6))))


def write_corpus(folder: Path) -> tuple[list[str], list[str]]:
    """(pretraining texts, fine-tuning texts): alternate source files go to each, so the two never share a row."""
    rng = random.Random(0)
    pre: list[str] = []
    tune: list[str] = []
    for i, path in enumerate(stdlib_files()):
        (pre if i % 2 == 0 else tune).extend(rows_of(docstrings(path), rng))
    with open(folder / "text.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in tune)
    return pre, tune


def train_tokenizer(texts: list[str], folder: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2], model_max_length=4096)
    fast.save_pretrained(folder)
    return fast


# ── the base model: random, then pretrained a little ─────────────────────────────────────────────────────
def pretrain(model: Any, tokenizer: Any, texts: list[str], steps: int, device: str) -> float | None:
    """A short full-weight pass over ``texts`` so LoRA starts from a model with some knowledge. Returns the
    last step's loss."""
    import torch

    from worker import data

    if steps <= 0:
        return None
    ids = [[tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False)][:MAX_LENGTH] for t in texts]
    random.Random(1).shuffle(ids)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    loss = None
    for step in range(steps):
        rows = [ids[(step * 16 + k) % len(ids)] for k in range(16)]
        batch = {k: v.to(device) for k, v in data.collate([data.Example(r, r) for r in rows],
                                                           tokenizer.pad_token_id).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    return float(loss.detach()) if loss is not None else None


def ensure(cache: Path, shape: str, pretrain_steps: int, device: str) -> Path:
    """Build (once, cached) the folder with the tokenizer, the pretrained base and text.jsonl."""
    top = cache / f"quality-{shape}-p{pretrain_steps}"
    if (top / DONE).exists():
        return top
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    staging = cache / f".{top.name}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "model").mkdir(parents=True)
    pre, tune = write_corpus(staging)
    tokenizer = train_tokenizer(pre + tune, staging / "model")
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    config = AutoConfig.for_model(**SHAPES[shape], vocab_size=len(tokenizer), **ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    started = time.monotonic()
    last = pretrain(model, tokenizer, pre, pretrain_steps, device)
    print(f"pretrained {pretrain_steps} steps in {time.monotonic() - started:.0f} s, last loss {last}",
          file=sys.stderr)
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(staging / "model")
    (staging / DONE).write_text("")
    shutil.rmtree(top, ignore_errors=True)
    os.rename(staging, top)
    return top


# ── the runs ─────────────────────────────────────────────────────────────────────────────────────────────
def training_spec(args: argparse.Namespace, batch: int, packing: bool) -> Any:
    from schemas.job import TrainingSpec

    return TrainingSpec(epochs=args.epochs, learning_rate=args.lr, batch_size=batch, max_length=MAX_LENGTH,
                        seed=0, eval_fraction=0.1, packing=packing, checkpoint_every_steps=10**9,
                        checkpoint_every_minutes=1e9)


def splits_of(folder: Path, args: argparse.Namespace) -> Any:
    """The worker's own split of the dataset: every recipe trains and is scored on exactly these rows."""
    from transformers import AutoTokenizer

    from worker import data

    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    return data.load_splits([folder / "text.jsonl"], tokenizer, training_spec(args, 1, False))


def run_worker(folder: Path, args: argparse.Namespace, batch: int, packing: bool) -> tuple[Row, Path]:
    from schemas.job import JobSpec
    from worker.train import TrainRequest, run_training

    name = f"worker ({'packed' if packing else 'padded'}, batch {batch})"
    job = JobSpec(id="quality", kind="train", base_model="models/base", dataset="datasets/text.jsonl",
                  lora={"r": 16, "alpha": 32, "dropout": args.dropout, "target_modules": "all-linear"},
                  training=training_spec(args, batch, packing).model_dump())
    root = Path(tempfile.mkdtemp(dir=args.cache, prefix="share-"))
    shutil.copytree(folder / "model", root / "models" / "base")
    (root / "datasets").mkdir()
    shutil.copy2(folder / "text.jsonl", root / "datasets" / "text.jsonl")
    req = TrainRequest(job=job, model_dir=root / "models" / "base", datasets=[root / "datasets" / "text.jsonl"],
                       share_root=root, out_dir=root / "results" / "quality" / "attempts" / "a1",
                       device=args.device, file_mode=0o664)
    started = time.monotonic()
    outcome = run_training(req, lambda progress: None, should_stop=lambda: False)
    m = outcome.metrics
    row = Row(name, own_eval_loss=m.eval_loss_after, tokens=m.tokens, steps=m.steps,
              tokens_per_step=round((m.padded_tokens or 0) / max(1, m.steps or 1)),
              seconds=round(time.monotonic() - started, 1), note="; ".join(outcome.notes))
    return row, outcome.adapter_dir


class Collate:
    """The worker's padding collator, counting the labelled tokens the Trainer really trained on."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id, self.labelled, self.padded = pad_id, 0, 0

    def __call__(self, batch: list[Any]) -> dict[str, Any]:
        from worker import data

        out = data.collate([b["example"] for b in batch], self.pad_id)
        self.labelled += int((out["labels"][:, 1:] != data.IGNORE).sum())
        self.padded += out["input_ids"].numel()
        return out


def run_hf(folder: Path, args: argparse.Namespace, splits: Any, out: Path) -> Row:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from worker import data

    cuda = args.device == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa").to(args.device)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout,
                                             target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    collate = Collate(data.pad_id_of(tokenizer))
    targs = TrainingArguments(
        output_dir=str(out / "hf"), num_train_epochs=args.epochs, learning_rate=args.lr, weight_decay=0.0,
        per_device_train_batch_size=args.hf_batch, gradient_accumulation_steps=args.hf_accum, bf16=cuda,
        lr_scheduler_type="linear", logging_strategy="no", save_strategy="no", report_to="none", seed=0,
        remove_unused_columns=False, dataloader_pin_memory=False, optim="adamw_torch", disable_tqdm=True,
        use_cpu=not cuda)
    trainer = Trainer(model=model, args=targs, train_dataset=[{"example": e} for e in splits.train],
                      data_collator=collate)
    started = time.monotonic()
    state = trainer.train()
    model.save_pretrained(out / "hf-adapter")
    steps = state.global_step
    return Row(f"tuned HF Trainer (batch {args.hf_batch} x {args.hf_accum})", tokens=collate.labelled,
               steps=steps, tokens_per_step=round(collate.padded / max(1, steps)),
               seconds=round(time.monotonic() - started, 1))


def score(folder: Path, adapter: Path | None, examples: list[Any], device: str) -> float:
    """Mean loss per labelled eval token of the base plus ``adapter``, loaded fresh in fp32: one scorer for all."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - the usual name
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from worker import data

    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).to(device)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).to(device)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            b = {k: v.to(device) for k, v in data.collate(examples[start:start + 16], 0).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            targets = b["labels"][:, 1:]
            keep = targets != data.IGNORE
            total += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    return total / max(1, count)


# ── output ───────────────────────────────────────────────────────────────────────────────────────────────
def table(rows: list[Row], base: float) -> str:
    head = ["recipe", "eval loss", "vs tuned", "own eval", "tokens", "steps", "tok/step incl. pad", "seconds"]
    tuned = next((r.eval_loss for r in rows if r.recipe.startswith("tuned") and r.eval_loss), None)

    def cells(r: Row) -> list[str]:
        rel = f"{(r.eval_loss - tuned) / tuned:+.2%}" if tuned and r.eval_loss else "-"
        return [r.recipe, _num(r.eval_loss), rel, _num(r.own_eval_loss), _num(r.tokens), _num(r.steps),
                _num(r.tokens_per_step), _secs(r.seconds)] + ([f"ERROR {r.error}"] if r.error else [])

    lines = [head, ["base (no adapter)", f"{base:.4f}", "", "", "", "", "", ""], *map(cells, rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + " ".join(line[len(head):])
            for line in lines]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def _num(v: float | int | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) and v < 100 else f"{v:,}"


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def verdict(rows: list[Row], base: float) -> list[str]:
    """PASS/FAIL per worker recipe, or INCONCLUSIVE when the Trainer itself moved the base too little: a 2% limit
    means nothing when an adapter that learned nothing would be within 2% too."""
    tuned = next((r for r in rows if r.recipe.startswith("tuned")), None)
    if tuned is None or tuned.eval_loss is None:
        return ["no verdict: the tuned HF Trainer produced no eval loss"]
    gain = (base - tuned.eval_loss) / tuned.eval_loss
    if gain < MIN_GAIN:
        return [f"INCONCLUSIVE: the Trainer's adapter is only {gain:.2%} below the base ({tuned.eval_loss:.4f} vs "
                f"{base:.4f}); the comparison needs at least {MIN_GAIN:.0%}: raise --epochs or --lr"]
    out = []
    for r in rows:
        if r is tuned or r.eval_loss is None:
            continue
        rel = (r.eval_loss - tuned.eval_loss) / tuned.eval_loss
        ok = rel <= TOLERANCE
        out.append(f"{'PASS' if ok else 'FAIL'} {r.recipe}: eval loss {r.eval_loss:.4f} vs {tuned.eval_loss:.4f} "
                   f"({rel:+.2%}, limit +{TOLERANCE:.0%}; base {base:.4f}, {_share_of_gain(r, tuned, base)} of "
                   f"the Trainer's gain) after {r.tokens:,} vs {tuned.tokens:,} tokens")
    return out


def _share_of_gain(r: Row, tuned: Row, base: float) -> str:
    assert r.eval_loss is not None and tuned.eval_loss is not None
    return f"{(base - r.eval_loss) / (base - tuned.eval_loss):.0%}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small", choices=list(SHAPES))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--hf-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3, help="for every recipe")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout, for every recipe")
    ap.add_argument("--pretrain-steps", type=int, default=150, help="full-weight steps of 16 rows before LoRA")
    ap.add_argument("--recipes", default="packed,padded,tuned", help="from: packed, padded, tuned")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/loraspool-bench"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    folder = ensure(args.cache, args.shape, args.pretrain_steps, args.device)
    splits = splits_of(folder, args)
    digest = hashlib.sha256((folder / "text.jsonl").read_bytes()).hexdigest()[:12]
    mean_len = sum(len(e.input_ids) for e in splits.train) / len(splits.train)
    rows_per_step = args.hf_batch * args.hf_accum
    packed_batch = max(1, round(rows_per_step * mean_len / MAX_LENGTH))
    print(f"dataset text.jsonl sha256 {digest}: {len(splits.train)} training rows (mean {mean_len:.0f} tokens), "
          f"{len(splits.eval)} eval rows; shape {args.shape} on {args.device}", file=sys.stderr)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=args.cache, prefix="quality-") as tmp:
        for recipe in args.recipes:
            try:
                if recipe == "tuned":
                    row, adapter = run_hf(folder, args, splits, Path(tmp)), Path(tmp) / "hf-adapter"
                else:
                    packing = recipe == "packed"
                    row, adapter = run_worker(folder, args, packed_batch if packing else rows_per_step, packing)
                row.eval_loss = score(folder, adapter, splits.eval, args.device)
            except Exception as e:  # one recipe's failure is its row's result, not the end of the run
                row = Row(recipe, error=f"{type(e).__name__}: {str(e).strip()[:300]}")
            rows.append(row)
            print(json.dumps(asdict(row)), flush=True)
        base = score(folder, None, splits.eval, args.device)
        for share in args.cache.glob("share-*"):
            shutil.rmtree(share, ignore_errors=True)
    if args.json:
        args.json.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows))
    print()
    print(table(rows, base))
    lines = verdict(rows, base)
    print("\n".join(lines))
    if any(line.startswith("INCONCLUSIVE") for line in lines):
        return 2
    return 0 if lines and all(line.startswith("PASS") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
