"""Local copies of base models, so a GPU's start-up reads an 8 GB base from local disk, not the network.

    CACHE/models/<name>-<hash of its share path>/
        .lock                       serialises copiers on this machine (a local filelock: reliable on local disk)
        v-<content digest>/         a verified copy: the model files and .loraspool-manifest.json
        .tmp-<pid>-<random>/        a copy in progress; renamed to v-<digest> when every file checks out

A copy is made once. Every file is hashed (sha256) as it is read from the share, read back from local disk and
hashed again, so a short read, a flaky network or a bad disk cannot leave a wrong file in the cache. The
manifest keeps each source file's (name, size, mtime_ns, sha256): the next job compares size and mtime_ns
with the share (a stat per file, no reading) and copies again only if they differ.

The rename of the finished folder is the commit. If two processes copy at once (the lock makes that rare), the
loser finds the winner's folder there and uses it. An older copy is never deleted: a job that started before
the share's copy changed may still be reading it. ``stale_copies`` lists them for a person to remove.

Only files a model folder legitimately has (``worker.modelguard``'s safetensors, configs and tokenizer files)
are copied; run ``check_model_dir`` on the share's folder first (``share_root=``) so a refusal names the
share's files, not the cache's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import psutil
from filelock import FileLock

from worker.modelguard import CODE_CONFIGS, SAFETENSORS_INDEX, TOKENIZER_FILES, check_model_dir
from worker.verify import hash_file

log = logging.getLogger(__name__)

MANIFEST = ".loraspool-manifest.json"
MODEL_FILES = frozenset({*TOKENIZER_FILES, *CODE_CONFIGS, SAFETENSORS_INDEX, "generation_config.json",
                         "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                         "chat_template.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model"})
TEMPLATE_DIR = "additional_chat_templates"  # transformers' CHAT_TEMPLATE_DIR: named chat templates, one file each
CHUNK = 8 * 1024 * 1024
Listing = list[tuple[str, int, int]]  # (name, size, mtime_ns), sorted by name


class CacheError(Exception):
    """No verified local copy could be made; the message says why and what to do. The caller may train from
    the share's folder instead."""


def local_copy(src_dir: Path, cache_dir: Path, *, share_root: Path | None = None,
               should_stop: Callable[[], bool] | None = None) -> Path:
    """A verified local copy of the model folder ``src_dir``, made now or found from an earlier job."""
    src = Path(src_dir)
    if share_root is not None:
        check_model_dir(src, share_root)
    listing = source_listing(src)
    key_dir = Path(cache_dir) / "models" / cache_key(src)
    try:
        key_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cannot create the model cache {key_dir} ({e}); set cache_dir in loraspool.toml to a "
                         "local folder the worker's account can write") from e
    with FileLock(str(key_dir / ".lock")):
        found = find_copy(key_dir, listing)
        if found is None:
            _sweep_dead_temps(key_dir)
            _check_space(key_dir, listing)
            found = _copy(src, key_dir, listing, should_stop or (lambda: False))
    stale = [p for p in copies(key_dir) if p != found]
    if stale:
        log.info("model cache: %d older cop%s of %s in %s, kept for jobs that may still read them; remove them "
                 "by hand when no job uses them", len(stale), "y" if len(stale) == 1 else "ies", src.name, key_dir)
    return found


def cache_key(src: Path) -> str:
    """One folder per share path: the name for people, a hash so two models called "base" do not collide."""
    real = os.path.realpath(src)
    slug = re.sub(r"[^A-Za-z0-9._-]", "-", Path(real).name).strip("-.") or "model"
    return f"{slug[:48]}-{hashlib.sha256(real.encode()).hexdigest()[:10]}"


def source_listing(src: Path) -> Listing:
    """The model files in ``src`` with their size and mtime: a stat each, cheap even across the network."""
    try:
        entries = sorted(os.scandir(src), key=lambda e: e.name)
    except OSError as e:
        raise CacheError(f"cannot list {src} ({e}); check the share is mounted") from e
    listing = _files(entries, "", _wanted)
    if not any(name.endswith(".safetensors") for name, _, _ in listing):
        raise CacheError(f"{src} has no *.safetensors file to cache")
    templates = src / TEMPLATE_DIR
    if templates.is_dir():  # transformers reads every *.jinja there, and "default.jinja" replaces the template
        try:
            extra = sorted(os.scandir(templates), key=lambda e: e.name)
        except OSError as e:
            raise CacheError(f"cannot list {templates} ({e}); check the share is mounted") from e
        listing += _files(extra, f"{TEMPLATE_DIR}/", lambda name: name.endswith(".jinja") and not name.startswith("."))
    return listing


def _files(entries: list[os.DirEntry[str]], prefix: str, wanted: Callable[[str], bool]) -> Listing:
    listing = []
    for entry in entries:
        if not wanted(entry.name) or not entry.is_file(follow_symlinks=True):
            continue
        st = entry.stat(follow_symlinks=True)
        listing.append((prefix + entry.name, st.st_size, st.st_mtime_ns))
    return listing


def _wanted(name: str) -> bool:
    return name in MODEL_FILES or (name.endswith(".safetensors") and not name.startswith("."))


def copies(key_dir: Path) -> list[Path]:
    """The committed copies in ``key_dir``, newest first."""
    found = [p for p in key_dir.glob("v-*") if (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def stale_copies(src_dir: Path, cache_dir: Path) -> list[Path]:
    """Copies of ``src_dir`` that no longer match the share's files: safe to remove once no job reads them."""
    key_dir = Path(cache_dir) / "models" / cache_key(Path(src_dir))
    if not key_dir.is_dir():
        return []
    current = find_copy(key_dir, source_listing(Path(src_dir)))
    return [p for p in copies(key_dir) if p != current]


def read_manifest(folder: Path) -> dict | None:
    try:
        doc = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("files"), list) else None


def find_copy(key_dir: Path, listing: Listing) -> Path | None:
    """A committed copy whose manifest matches the share's sizes and mtimes, and whose files are all there."""
    for folder in copies(key_dir):
        doc = read_manifest(folder)
        if doc is None:
            continue
        seen = sorted((f["name"], f["size"], f["mtime_ns"]) for f in doc["files"])
        if seen == listing and all(_size(folder / name) == size for name, size, _ in listing):
            return folder
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _sweep_dead_temps(key_dir: Path) -> None:
    """Remove our own unfinished copies whose process is gone (a crash or a kill mid-copy)."""
    for tmp in key_dir.glob(".tmp-*"):
        parts = tmp.name.split("-")
        if len(parts) >= 3 and parts[1].isdigit() and not psutil.pid_exists(int(parts[1])):
            shutil.rmtree(tmp, ignore_errors=True)


def _check_space(key_dir: Path, listing: Listing) -> None:
    need = sum(size for _, size, _ in listing)
    free = shutil.disk_usage(key_dir).free
    margin = max(need // 20, 256 * 1024 * 1024)
    if free < need + margin:
        old = copies(key_dir)
        hint = f"; older copies you may remove: {', '.join(map(str, old))}" if old else ""
        raise CacheError(f"the model cache {key_dir} has {free / 1e9:.1f} GB free, the model needs "
                         f"{need / 1e9:.1f} GB; free space there or point cache_dir at a larger disk{hint}")


def _copy(src: Path, key_dir: Path, listing: Listing, should_stop: Callable[[], bool]) -> Path:
    tmp = key_dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    total = sum(size for _, size, _ in listing)
    log.info("copying base model %s (%.2f GB) to the local cache %s", src, total / 1e9, key_dir)
    t0 = time.monotonic()
    try:
        files = [_copy_one(src, tmp, entry, should_stop) for entry in listing]
        digest = hashlib.sha256(json.dumps([(f["name"], f["size"], f["sha256"]) for f in files]).encode())
        manifest = {"source": os.path.realpath(src), "digest": digest.hexdigest(), "files": files,
                    "copied_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_manifest(tmp, manifest)
        final = commit(tmp, key_dir / f"v-{digest.hexdigest()[:16]}", manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own scratch folder, never a copy another job may use
        raise
    seconds = max(time.monotonic() - t0, 1e-6)
    log.info("base model %s cached in %.1fs (%.0f MB/s): %s", src.name, seconds, total / 1e6 / seconds, final)
    return final


def _copy_one(src: Path, tmp: Path, entry: tuple[str, int, int], should_stop: Callable[[], bool]) -> dict:
    name, size, mtime_ns = entry
    source_hash = hashlib.sha256()
    (tmp / name).parent.mkdir(exist_ok=True)  # additional_chat_templates/
    with open(src / name, "rb") as fin, open(tmp / name, "wb") as fout:
        while chunk := fin.read(CHUNK):
            if should_stop():
                raise CacheError("stopped while copying the base model; the next job copies it again")
            source_hash.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    st = os.stat(src / name)
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        raise CacheError(f"{src / name} changed while it was copied (someone is still copying the model to the "
                         "share?); the job can run again once the copy on the share is complete")
    if hash_file(tmp / name) != source_hash.hexdigest():
        raise CacheError(f"the local copy of {name} differs from what was read from the share; check the cache "
                         f"disk ({tmp.parent}) for errors")
    return {"name": name, "size": size, "mtime_ns": mtime_ns, "sha256": source_hash.hexdigest()}


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def commit(tmp: Path, final: Path, manifest: dict) -> Path:
    """Rename the finished copy into place. If ``final`` is already there (same content: a racing process, or
    the share's files were touched without changing), keep that one and record the new mtimes in it."""
    try:
        os.rename(tmp, final)
        return final
    except OSError:  # Linux: ENOTEMPTY/EEXIST; Windows: FileExistsError or a sharing violation
        if read_manifest(final) is None:
            raise
    _write_manifest(final, manifest)  # only sizes/mtimes can differ: the digest names the content
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.utime(final)  # newest first in copies()
    return final
