"""Hashes of a saved adapter, so whoever uses it can tell it arrived whole over the share, and of a base model,
so an adapter can tell which base it belongs to. No torch: the registry and the CLI hash on a laptop."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from schemas.adapter import BaseHashCache, BaseIdentity, CachedHash, FileEntry
from spooler.atomic import dir_mode_for, makedirs, write_json
from spooler.share import read_model

log = logging.getLogger(__name__)

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
    entries = file_entries(folder)
    return {name: e.sha256 for name, e in entries.items()}, sum(e.size for e in entries.values())


# ── manifests and base identity (no torch: the registry and the CLI use these on a laptop) ─────────────────
BASE_CONFIG = "config.json"
BASE_INDEX = "model.safetensors.index.json"


def file_entries(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, FileEntry]:
    """{relative name: FileEntry(sha256, size)} for every regular file under ``folder`` but ``skip``."""
    folder = Path(folder)
    entries: dict[str, FileEntry] = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink() or not path.is_file() or name in skip:
            continue
        entries[name] = FileEntry(sha256=hash_file(path), size=path.stat().st_size)
    return entries


def compare_files(folder: Path, expected: dict[str, FileEntry], skip: tuple[str, ...] = ()) -> list[str]:
    """What differs between ``folder`` and the hashes it was registered with; [] when it is whole."""
    problems = []
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    present -= set(skip)
    for name in sorted(set(expected) - present):
        problems.append(f"{name} is missing")
    for name in sorted(present - set(expected)):
        problems.append(f"{name} is not in the manifest")
    for name in sorted(set(expected) & present):
        path = folder / name
        if path.is_symlink():
            problems.append(f"{name} is a symlink; registered files are plain files")
            continue
        size = path.stat().st_size
        if size != expected[name].size:
            problems.append(f"{name} has {size} bytes, the manifest says {expected[name].size}")
        elif hash_file(path) != expected[name].sha256:
            problems.append(f"{name} has a different sha256 than the manifest (same size: changed in place)")
    return problems


def base_files(model_dir: Path) -> list[Path]:
    """The files that make a base model that model: config and weights, not the tokenizer or a README."""
    names = [p for p in sorted(Path(model_dir).iterdir()) if p.is_file()]
    return [p for p in names if p.name in (BASE_CONFIG, BASE_INDEX) or p.name.endswith(".safetensors")]


def _combined(files: dict[str, FileEntry]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name].sha256}\n".encode())
    return digest.hexdigest()


def base_identity(model_dir: Path, rel_path: str, cache_file: Path | None = None, rehash: bool = False,
                  file_mode: int = 0o664) -> BaseIdentity:
    """The base model's identity. Each file's hash is reused from ``cache_file`` while its size and mtime are
    the ones it was hashed at, so a multi-GB base is read once; ``rehash`` reads everything again (a file
    rewritten with its old size and mtime kept, as ``cp -p`` can, fools the cache)."""
    cache = None if rehash or cache_file is None else read_model(cache_file, BaseHashCache)
    known = cache.files if cache is not None and cache.path == rel_path else {}
    fresh: dict[str, CachedHash] = {}
    for path in base_files(model_dir):
        st = path.stat()
        hit = known.get(path.name)
        if hit is None or (hit.size, hit.mtime_ns) != (st.st_size, st.st_mtime_ns):
            hit = CachedHash(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=hash_file(path))
        fresh[path.name] = hit
    if cache_file is not None and fresh != known:
        _save_cache(cache_file, BaseHashCache(path=rel_path, files=fresh), file_mode)
    files = {n: FileEntry(sha256=h.sha256, size=h.size) for n, h in fresh.items()}
    return BaseIdentity(path=rel_path, sha256=_combined(files), files=files,
                        size_bytes=sum(e.size for e in files.values()))


def _save_cache(cache_file: Path, record: BaseHashCache, file_mode: int) -> None:
    """Best effort: a cache that cannot be written only costs a rehash next time."""
    try:
        makedirs(cache_file.parent, dir_mode_for(file_mode))
        write_json(cache_file, record, file_mode)
    except OSError as e:
        log.warning("base hash cache %s not written: %s; the base will be hashed again next time", cache_file, e)
