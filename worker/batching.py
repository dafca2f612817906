"""Batches for the training loop: padded and length-grouped, or packed into full rows.

Padding is wasted compute: instruction data has a long tail of lengths, so a random batch padded to its longest
row is often half padding. Two remedies:

* length-grouped (padded mode): rows of similar length share a batch, so padding stays small, while the order of
  the batches is still random;
* packed: rows are laid end to end in sequences of exactly ``max_length`` tokens, with ``position_ids`` starting
  again at 0 for each row. No attention mask is passed: transformers then builds a block-diagonal causal mask from
  the position ids (``find_packed_sequence_indices``), so no row attends to another, and the first token of each
  row is never a target of the row before it. With packing, ``batch_size`` counts packed sequences.

The order is a pure function of (seed, epoch, world size): a resumed job skips ``batch_in_epoch`` batches of the
same epoch and sees exactly the batches it would have seen. With DDP, a step's global batch is ``world`` ×
``batch_size`` rows, as one process with the whole batch would take them, and rank r trains on its slice.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from worker.data import IGNORE, Example

GROUP = 8  # length grouping sorts within windows of this many batches: local order, global randomness


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None  # None when packed: the mask comes from position_ids
    position_ids: torch.Tensor | None
    real_tokens: int  # non-padding tokens on this rank
    padded_tokens: int  # tokens computed on, padding included

    def to(self, device: str) -> Batch:
        """On the device. To a GPU from pinned memory: from pageable memory the CPU waits for the copy before it
        can queue the step's kernels; pinned, the copy is queued with them (torch's pinned-memory cache keeps
        the host copy until the GPU has read it)."""
        pin = device.startswith("cuda")

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else (t.pin_memory() if pin else t).to(device, non_blocking=True)

        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.position_ids),
                     self.real_tokens, self.padded_tokens)

    def pieces(self, max_tokens: int | None) -> list[Batch]:
        """The rows in pieces of at most ``max_tokens`` tokens each (one row at least), for a step that adds up
        the gradients of several forwards; the whole batch when None. The step counts its tokens on the whole
        batch, so a piece's own counts are left at 0."""
        rows, width = self.input_ids.shape
        per = rows_per_piece(max_tokens, width, rows)
        if per >= rows:
            return [self]

        def part(t: torch.Tensor | None, at: int) -> torch.Tensor | None:
            return None if t is None else t[at:at + per]

        return [Batch(self.input_ids[at:at + per], self.labels[at:at + per], part(self.attention_mask, at),
                      part(self.position_ids, at), 0, 0) for at in range(0, rows, per)]


def rows_per_piece(max_tokens: int | None, width: int, rows: int) -> int:
    """How many rows of ``width`` tokens one piece of a step takes: all ``rows`` when ``max_tokens`` is None."""
    return rows if max_tokens is None else min(rows, max(1, max_tokens // max(1, width)))


class Batcher:
    def __init__(self, examples: list[Example], batch_size: int, max_length: int, pad_id: int, seed: int,
                 packed: bool, world: int = 1, rank: int = 0) -> None:
        self.examples, self.batch_size, self.max_length = examples, batch_size, max_length
        self.pad_id, self.seed, self.packed, self.world, self.rank = pad_id, seed, packed, world, rank
        self._cache: tuple[int, list[list[list[int]]]] | None = None
        self._targets: tuple[int, float] | None = None  # (epoch, mean targets per step)
        self._target_counts: list[int] | None = None
        # The padded tail of a packed row restarts its positions every this many tokens: never past a real row's,
        # so a model with a learned position table of the longest row's length takes any max_length.
        self._tail_span = max((len(e.input_ids) for e in examples), default=1) or 1

    def steps_per_epoch(self) -> int:
        return len(self.epoch_plan(0))

    def targets_per_step(self, epoch: int) -> float:
        """The epoch's mean count of labelled targets per step: the loss divides each step's sum by this, not by the
        step's own count, so every target weighs the same over the epoch. Length-grouped batches of short rows hold
        far fewer targets than batches of long rows; a per-step mean would weigh each of their tokens several times
        more, and training would fit short rows at the expense of the long ones that hold most tokens."""
        if self._targets is None or self._targets[0] != epoch:  # asked every step: counted once an epoch
            plan = self.epoch_plan(epoch)
            total = sum(self._counts()[i] for step in plan for row in step for i in row)
            self._targets = (epoch, total / max(1, len(plan)))
        return self._targets[1]

    def _counts(self) -> list[int]:
        if self._target_counts is None:
            self._target_counts = [sum(1 for y in e.labels[1:] if y != IGNORE) for e in self.examples]
        return self._target_counts

    def epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's optimizer steps; each step is a list of rows, each row a list of example indices."""
        if self._cache is None or self._cache[0] != epoch:
            rows = self._packed_rows(epoch) if self.packed else self._grouped_rows(epoch)
            self._cache = (epoch, self._steps(rows, epoch))
        return self._cache[1]

    def batch(self, epoch: int, index: int) -> Batch:
        step = self.epoch_plan(epoch)[index]
        share = -(-len(step) // self.world)  # ceil: rank r takes rows [r*share, (r+1)*share)
        mine = step[self.rank * share:(self.rank + 1) * share]
        return self._collate_packed(mine) if self.packed else self._collate_padded([r[0] for r in mine])

    # ── order ───────────────────────────────────────────────────────────────────────────────────────────
    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _grouped_rows(self, epoch: int) -> list[list[int]]:
        order, window = self._shuffled(epoch), self.batch_size * self.world * GROUP
        rows: list[list[int]] = []
        for start in range(0, len(order), window):
            rows += [[i] for i in sorted(order[start:start + window], key=lambda i: len(self.examples[i].input_ids))]
        return rows

    def _packed_rows(self, epoch: int) -> list[list[int]]:
        """Best-fit decreasing bin packing: each row, longest first, goes into the fullest sequence it still fits.
        Greedy packing in arrival order leaves about a quarter of each sequence as padding on instruction-length
        data (measured: 23% on the benchmark's lengths); best fit leaves a few percent. The rows are shuffled
        first, so equal lengths land differently each epoch, and the sequences are shuffled after."""
        order = sorted(self._shuffled(epoch), key=lambda i: -len(self.examples[i].input_ids))
        bins: list[list[int]] = []
        free: list[tuple[int, int]] = []  # (room left, bin index), kept sorted
        for i in order:
            n = len(self.examples[i].input_ids)
            at = bisect.bisect_left(free, (n, -1))
            if at < len(free):
                room, b = free.pop(at)
            else:
                room, b = self.max_length, len(bins)
                bins.append([])
            bins[b].append(i)
            if room - n > 0:
                bisect.insort(free, (room - n, b))
        random.Random(self.seed * 104_729 + epoch).shuffle(bins)
        return bins

    def _steps(self, rows: list[list[int]], epoch: int) -> list[list[list[int]]]:
        per_step = self.batch_size * self.world
        steps = [rows[i:i + per_step] for i in range(0, len(rows), per_step)]
        if self.world > 1 and steps and len(steps[-1]) < self.world:
            steps.pop()  # a rank with no rows would hang the all-reduce; those few rows wait for the next epoch
        if not self.packed:  # length-grouped batches in a random order, or every epoch would go short to long
            random.Random(self.seed * 7919 + epoch).shuffle(steps)
        return steps

    # ── tensors ─────────────────────────────────────────────────────────────────────────────────────────
    def _collate_padded(self, indices: list[int]) -> Batch:
        """Right padding to the longest row: pads get attention 0 and label IGNORE."""
        rows = [self.examples[i] for i in indices]
        width = max(len(e.input_ids) for e in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, e in enumerate(rows):
            n = len(e.input_ids)
            ids[r, :n] = torch.tensor(e.input_ids)
            labels[r, :n] = torch.tensor(e.labels)
            mask[r, :n] = 1
        real = int(mask.sum())
        return Batch(ids, labels, mask, None, real, ids.numel())

    def _collate_packed(self, rows: list[list[int]]) -> Batch:
        ids = torch.full((len(rows), self.max_length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), self.max_length), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), self.max_length), dtype=torch.long)
        real = 0
        for r, members in enumerate(rows):
            at = 0
            for i in members:
                e = self.examples[i]
                n = len(e.input_ids)
                ids[r, at:at + n] = torch.tensor(e.input_ids)
                labels[r, at:at + n] = torch.tensor(e.labels)
                labels[r, at] = IGNORE  # never learn a row's first token from the row packed before it
                positions[r, at:at + n] = torch.arange(n)
                at += n
            real += at
            positions[r, at:] = torch.arange(self.max_length - at) % self._tail_span  # sequences of their own
        return Batch(ids, labels, None, positions, real, ids.numel())


def collate_eval(examples: list[Example], pad_id: int) -> Batch:
    """Padded batches for evaluation, which sees every row once in file order."""
    return Batcher(examples, len(examples), 0, pad_id, 0, False)._collate_padded(list(range(len(examples))))
