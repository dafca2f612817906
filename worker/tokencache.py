"""Tokenized dataset rows, kept on the share beside the datasets: ``datasets/.tokens/<key>.safetensors``.

Why: tokenizing is CPU work that every job on a dataset repeats while the GPU waits. A sweep of five jobs, or an
attempt resumed after a crash, tokenizes the same rows with the same tokenizer again (20,000 two-turn chat rows
take 17 s on a 2-core machine). The key is everything the tokens depend on: the dataset's bytes (their sha256,
each file's size and name), the tokenizer as loaded (vocabulary, rules, chat template, special tokens), the
library versions, and ``FORMAT``. Rows are kept untruncated, so jobs with any ``max_length`` share them, and the
first job's tokens serve the fallback laptop too.

The file is input like anything else on the share: it is safetensors (nothing is unpickled), its shapes are
bounded by the dataset before anything is read, it is copied into memory (never mapped), its arrays are checked
before use, and one that fails a check is ignored and written again. It is only a cache: a person may delete
``datasets/.tokens/`` at any time and loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spooler.atomic import dir_mode_for, makedirs, write_bytes
from spooler.paths import link_below
from spooler.share import TOKEN_CACHE
from worker.data import IGNORE

if TYPE_CHECKING:
    from worker.data import Reading

log = logging.getLogger(__name__)

FORMAT = 1  # bump whenever worker.data.row_tokens changes what a row becomes
FOLDER = Path(TOKEN_CACHE)
# A hostile file may claim any shapes: more rows than the dataset has lines, or more tokens than its bytes and a
# generous template overhead per row could make, is refused before anything is read into memory.
TOKENS_PER_BYTE, TOKENS_PER_ROW = 4, 4096

Tokens = tuple[list[int], list[int]]  # (input ids, labels: the id where trained, IGNORE elsewhere)
RowKey = tuple[str, int]  # (the file's label, the line number): a row's place in the dataset


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer as loaded, not its files: transformers reads more than any list of names (extra chat
    templates, versioned tokenizer files), and this is what tokenizing uses."""
    import jinja2
    import tokenizers
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__name__, tokenizer.chat_template, tokenizer.bos_token, tokenizer.bos_token_id,
             tokenizer.eos_token, tokenizer.eos_token_id, len(tokenizer), tokenizers.__version__,
             transformers.__version__, jinja2.__version__]
    h = hashlib.sha256(json.dumps(parts, default=str).encode())
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    return h.hexdigest()


def cache_key(reading: Reading, file_labels: list[str], tokenizer_id: str) -> str:
    """What the tokens of every row depend on, hashed. The files' sizes go in with their joint sha256: a line
    moved from the end of one file to the start of the next leaves the sha256 as it was."""
    return hashlib.sha256(json.dumps([FORMAT, reading.sha256, reading.sizes, file_labels, tokenizer_id]).encode()
                          ).hexdigest()


class TokenCache:
    """The rows of one (dataset, tokenizer) pair tokenized so far; ``tokens`` adds the missing ones, ``save``
    writes them back when any were added."""

    def __init__(self, path: Path, key: str, file_labels: list[str], vocab: int, file_mode: int,
                 limits: tuple[int, int], write: bool = True) -> None:
        """``limits``: the most rows and tokens a file for this dataset can honestly hold."""
        self.path, self.key, self.labels, self.vocab, self.file_mode = path, key, file_labels, vocab, file_mode
        self.limits, self.write = limits, write
        self._index: dict[RowKey, int] = {}
        self._ids = torch.zeros(0, dtype=torch.int32)
        self._trained = torch.zeros(0, dtype=torch.uint8)
        self._offsets = torch.zeros(1, dtype=torch.int64)
        self._new: dict[RowKey, tuple[array, bytes]] = {}  # compact: a long row costs 5 bytes a token, not 70
        self.hits = 0
        if path.is_file():
            self._load(path)

    def tokens(self, key: RowKey, make: Callable[[], Tokens]) -> Tokens:
        """The row's tokens, from the cache or made now (and kept for ``save`` by the process that writes)."""
        i = self._index.get(key)
        if i is None:
            ids, labels = make()
            if self.write:
                self._new[key] = (array("i", ids), bytes(lab != IGNORE for lab in labels))
            return ids, labels
        self.hits += 1
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        ids = self._ids[a:b].tolist()
        labels = [t if m else IGNORE for t, m in zip(ids, self._trained[a:b].tolist(), strict=True)]
        return ids, labels

    def save(self) -> None:
        """Write every row known (old and new) to the share; a failure is logged, never raised: it is a cache."""
        if not self._new:  # nothing new, or a process that does not write (it keeps nothing)
            return
        try:
            makedirs(self.path.parent, dir_mode_for(self.file_mode))
            write_bytes(self.path, self._serialize(), self.file_mode)
        except OSError as e:
            log.warning("tokenized rows not cached at %s: %s: %s (the next job tokenizes them again)", self.path,
                        type(e).__name__, e)

    def _serialize(self) -> bytes:
        from safetensors.torch import save

        old = sorted(self._index.items(), key=lambda kv: kv[1])
        flat_ids, flat_trained = array("i"), bytearray()  # C arrays: torch reads them without a per-number copy
        for ids, trained in self._new.values():
            flat_ids.extend(ids)
            flat_trained += trained
        new_ids = torch.frombuffer(flat_ids, dtype=torch.int32) if flat_ids else torch.zeros(0, dtype=torch.int32)
        new_trained = (torch.frombuffer(flat_trained, dtype=torch.uint8) if flat_trained
                       else torch.zeros(0, dtype=torch.uint8))
        lengths = torch.tensor([len(ids) for ids, _ in self._new.values()], dtype=torch.int64)
        offsets = torch.cat([self._offsets, self._offsets[-1] + torch.cumsum(lengths, 0)])
        file_of = {label: n for n, label in enumerate(self.labels)}
        rows = [(file_of[f], line) for (f, line), _ in old] + [(file_of[f], line) for f, line in self._new]
        tensors = {"rows": torch.tensor(rows, dtype=torch.int64).reshape(-1, 2), "offsets": offsets,
                   "ids": torch.cat([self._ids, new_ids]),
                   "trained": torch.cat([self._trained, new_trained])}
        return save(tensors, metadata={"format": str(FORMAT), "key": self.key, "files": json.dumps(self.labels)})

    def _load(self, path: Path) -> None:
        try:
            tensors, meta = _read(path, self.limits)
            self._check(tensors, meta)
        except Exception as e:  # a broken, cut short or hostile file: tokenize again and replace it
            log.warning("ignoring the token cache %s (%s: %s); it is written again", path, type(e).__name__,
                        str(e)[:200])
            return
        self._ids, self._trained, self._offsets = tensors["ids"], tensors["trained"], tensors["offsets"]
        self._index = {(self.labels[int(f)], int(line)): i for i, (f, line) in enumerate(tensors["rows"].tolist())}

    def _check(self, t: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """Every array the right type and shape, every offset in order, every id in the vocabulary."""
        if meta.get("format") != str(FORMAT) or meta.get("key") != self.key:
            raise ValueError("written for another dataset, tokenizer or format")
        want = {"rows": torch.int64, "offsets": torch.int64, "ids": torch.int32, "trained": torch.uint8}
        if {k: v.dtype for k, v in t.items()} != want:
            raise ValueError(f"unexpected arrays {sorted(t)}")
        rows, offsets, ids, trained = t["rows"], t["offsets"], t["ids"], t["trained"]
        n = rows.shape[0] if rows.dim() == 2 and rows.shape[1] == 2 else -1
        if n < 0 or offsets.shape != (n + 1,) or ids.dim() != 1 or trained.shape != ids.shape:
            raise ValueError("array shapes do not agree")
        if int(offsets[0]) != 0 or int(offsets[-1]) != ids.numel() or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("row offsets out of order")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab or int(trained.max()) > 1):
            raise ValueError("token ids outside the vocabulary")
        if n and (int(rows[:, 0].min()) < 0 or int(rows[:, 0].max()) >= len(self.labels)):
            raise ValueError("rows of unknown files")


def _read(path: Path, limits: tuple[int, int]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The arrays, copied into memory (a mapping of the share's file would let a later edit of it, or another
    worker replacing it, change tokens after they were checked), once the header's shapes are within bounds."""
    from safetensors import safe_open
    from safetensors.torch import load

    with safe_open(str(path), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata() or {})
    rows, tokens = limits
    if len(shapes.get("rows", [])) != 2 or shapes["rows"][0] > rows or len(shapes.get("ids", [])) != 1 \
            or shapes["ids"][0] > tokens:
        raise ValueError(f"shapes {shapes} exceed what the dataset can hold ({rows} rows, {tokens} tokens)")
    return load(path.read_bytes()), meta


def for_dataset(share_root: Path, file_labels: list[str], tokenizer: Any, file_mode: int,
                write: bool = True) -> Callable[[Reading], TokenCache] | None:
    """The cache of a dataset, by what was read of it. ``write``: False on DDP ranks but the first, which read
    the cache and leave writing it to that one. None when datasets/.tokens is, or is under, a link: the worker
    would write where it leads with its own rights (out of the share, or into a write-once adapter version), and
    read rows someone else made."""
    if link := link_below(share_root, share_root / FOLDER):
        log.warning("%s is a link (to %s): tokenized rows are neither read from nor kept there", link,
                    os.path.realpath(link))
        return None
    tokenizer_id = tokenizer_fingerprint(tokenizer)

    def open_cache(reading: Reading) -> TokenCache:
        key = cache_key(reading, file_labels, tokenizer_id)
        limits = (reading.lines, TOKENS_PER_BYTE * sum(reading.sizes) + TOKENS_PER_ROW * reading.lines)
        return TokenCache(share_root / FOLDER / f"{key[:40]}.safetensors", key, file_labels, len(tokenizer),
                          file_mode, limits, write)

    return open_cache
