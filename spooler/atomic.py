"""Atomic writes: a temp file in the same folder, fsync, then ``os.replace``.

A reader on another machine sees the old bytes or the new, never half. On Windows ``os.replace`` fails with
a sharing violation while any process holds the target open (an antivirus scan, a person's editor, another
machine's status reading the heartbeat), so we retry for a while instead of losing the write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel

REPLACE_RETRY_SECONDS = 5.0
SHARING_ERRNOS = {errno.EACCES, errno.EBUSY, errno.EPERM, errno.EIO, errno.ETXTBSY}


def tmp_name(target: Path) -> Path:
    # A dot name with a .tmp suffix: every reader of the share skips such names, and a leftover one is
    # harmless and says where it came from.
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")


def replace_with_retry(src: Path, dst: Path, deadline_s: float = REPLACE_RETRY_SECONDS) -> None:
    end = time.monotonic() + deadline_s
    delay = 0.01
    while True:
        try:
            os.replace(src, dst)
            return
        except OSError as e:
            # A sharing violation: Windows, or any SMB client, while another process has ``dst`` open without
            # FILE_SHARE_DELETE. rclone's SMB mount reports it as EIO. Transient by nature: retry, then give up.
            if e.errno not in SHARING_ERRNOS or time.monotonic() > end:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def place_new(src: Path, dst: Path) -> bool:
    """Give ``src`` the name ``dst`` only if no file has it; False, ``src`` left as it was, when one has.
    ``os.rename`` replaces on POSIX, so a check before it leaves a race in which a second writer's file silently
    takes the place of the first. A hard link fails on an existing name, atomically; Windows' rename already
    refuses to replace. A share that allows no links (some SMB servers) gets the checked rename, race and all."""
    try:
        os.link(src, dst)
    except FileExistsError:
        return False
    except FileNotFoundError:
        raise
    except OSError:  # no links here (EPERM, EOPNOTSUPP, ...): the checked rename
        if dst.exists():
            return False
        try:
            os.rename(src, dst)
        except FileExistsError:  # Windows
            return False
        return True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(src)
    return True


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Not possible on Windows or some network filesystems; best effort."""
    if sys.platform == "win32":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file a library wrote (safetensors, peft) to the share before anyone is told it exists.
    A client with a write-back cache (rclone's VFS holds read-write files 5 s by default) would otherwise
    report success for bytes that are still only on this machine."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            except OSError:
                pass  # some filesystems refuse fsync on a read-only descriptor; the close still flushes
            finally:
                os.close(fd)
    fsync_dir(folder)


def write_bytes(target: Path, data: bytes, mode: int = 0o664) -> None:
    tmp = tmp_name(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, mode)
        replace_with_retry(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # our own temp file, never a person's
        raise
    fsync_dir(target.parent)


def write_json(target: Path, record: BaseModel | dict[str, Any], mode: int = 0o664) -> bytes:
    """Write ``record`` atomically; returns the bytes written, for a caller that compares them later."""
    if isinstance(record, BaseModel):
        try:
            text = record.model_dump_json(indent=2)
        except ValueError:  # pydantic's serialization error: a str with a lone surrogate (see _writable)
            text = json.dumps(_writable(record.model_dump(mode="json")), indent=2, ensure_ascii=False)
    else:
        text = json.dumps(record, indent=2, sort_keys=True)
    data = (text + "\n").encode()
    write_bytes(target, data, mode)
    return data


def _writable(value: Any) -> Any:
    """``value`` with every string made UTF-8 text. A file name that is not UTF-8 comes to Python as lone
    surrogates, which no JSON text can carry, and an error quoting it would make its record unwritable (and the
    job, whose outcome could never be delivered, would run again and again): they become backslash escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_writable(k): _writable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_writable(v) for v in value]
    return value


def dir_mode_for(file_mode: int) -> int:
    """The folder mode that matches a file mode: whoever may read a file may list its folder (0664 -> 0775)."""
    return file_mode | ((file_mode & 0o444) >> 2)


def open_append(path: Path) -> IO[str]:
    """Open a log for appending, never through a link (O_NOFOLLOW where the OS has it): a link planted in its
    place would have the worker append to, and later move, a file of someone else's."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    return open(os.open(path, flags, 0o666), "a", encoding="utf-8", newline="\n")  # noqa: SIM115 - the caller's


def makedirs(path: Path, mode: int) -> Path:
    """mkdir -p with ``mode`` on every folder it creates, not only the last: mkdir's own mode is cut by the
    umask, and the share's other users must write in them (adapters/ and adapters/<name>/, datasets/.tokens/)."""
    created, p = [], Path(path)
    while not p.is_dir() and p.parent != p:
        created.append(p)
        p = p.parent
    Path(path).mkdir(parents=True, exist_ok=True)
    for folder in reversed(created):
        with contextlib.suppress(OSError):  # a share that ignores modes (SMB, FAT) is fine as it is
            os.chmod(folder, mode)
    return Path(path)


def chmod_tree(folder: Path, file_mode: int) -> None:
    """Give every file ``file_mode`` and every folder the matching mode: safetensors and torch.save write 0600,
    mkdir what the umask allows, and other users of the share must read what a worker wrote."""
    os.chmod(folder, dir_mode_for(file_mode))
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode_for(file_mode))
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)
