"""Hashes of a saved adapter, so whoever uses it can tell it arrived whole over the share."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20  # 1 MiB: adapters can be gigabytes; never read one whole


def hash_file(path: Path) -> str:
    """sha256 hex digest of one file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_folder(folder: Path) -> tuple[dict[str, str], int]:
    """({relative posix name: sha256 hex}, total bytes) for every regular file under ``folder``, sorted by name.

    Symlinks are skipped: the training writes none, and following one would hash a file outside the adapter.
    """
    folder = Path(folder)
    files: dict[str, str] = {}
    total = 0
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        files[path.relative_to(folder).as_posix()] = hash_file(path)
        total += path.stat().st_size
    return files, total
