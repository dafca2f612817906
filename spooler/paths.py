"""Paths that come from job files. No path named by a job may leave the share."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from spooler.errors import Rejected


def share_path_problem(value: str) -> str | None:
    """Why ``value`` is not a share-relative path, judged on its text alone (symlinks are checked later)."""
    if not value or value.strip() != value:
        return f"{value!r} is empty or has leading/trailing spaces"
    if "\x00" in value:
        return "contains a NUL byte"
    win = PureWindowsPath(value)
    if PurePosixPath(value).is_absolute() or win.is_absolute() or win.drive or value.startswith(("\\", "/")):
        return f"{value!r} is absolute; give a path relative to the share, like \"models/my-model\""
    parts = value.replace("\\", "/").split("/")
    if ".." in parts:
        return f"{value!r} has a '..' component; paths must stay inside the share"
    if (size := len(value.encode("utf-8", "surrogatepass"))) > MAX_PATH_BYTES:
        return f"is {size} bytes long (UTF-8); a share path may have {MAX_PATH_BYTES} bytes at most"
    for part in parts:
        if (size := len(part.encode("utf-8", "surrogatepass"))) > MAX_NAME_BYTES:
            return f"has a name of {size} bytes ({part[:20]!r}...); file systems allow {MAX_NAME_BYTES} bytes"
        if problem := _windows_problem(part):
            return f"{value!r}: {problem}"
    return None


# What Linux and most file servers allow: longer failed as "File name too long" deep in a load, a failed job.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 1024


def _windows_problem(part: str) -> str | None:
    """A path component a Windows worker would open as a device: ``datasets/CON`` reads the console, and the
    job would wait on it forever. (A ':' or a trailing '.' is left alone: on Windows they name data inside the
    share, or the same file, and on Linux shares they are ordinary names, like ``models/qwen3:0.6b``.)"""
    from schemas.job import WINDOWS_RESERVED  # schemas imports this module's callers, not this module

    if part.split(".")[0].rstrip(" ").lower() in WINDOWS_RESERVED:
        return f"{part!r} is a name Windows reserves for a device"
    return None


def outside_share(root: Path, path: Path) -> str | None:
    """Where ``path`` really leads when a symlink takes it out of the share, else None. For a path not made yet
    too: ``realpath`` resolves the part that exists, so check before ``makedirs`` follows a link out."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return None if real == real_root or real.startswith(real_root + os.sep) else real


def link_below(root: Path, path: Path) -> Path | None:
    """The first part of ``path`` below ``root`` (``path`` itself included) that is a symbolic link or a Windows
    junction, or None. ``results/<id>/`` is writable by anyone with the share: a link planted there would have
    the worker write, append, move and remove through it, into a teammate's folder or out of the share, with
    the worker's own rights. Parts that do not exist yet end the walk (nothing below them can be a link)."""
    current = Path(root)
    for part in Path(path).relative_to(root).parts:
        current = current / part
        try:
            st = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):  # nothing below a missing part or a file is a link
            return None
        if stat.S_ISLNK(st.st_mode) or getattr(st, "st_reparse_tag", 0) in _LINK_TAGS:
            return current
    return None


# Windows symlinks and junctions; not every reparse point (deduplicated and OneDrive placeholder files are too).
_LINK_TAGS = (getattr(stat, "IO_REPARSE_TAG_SYMLINK", 0xA000000C),
              getattr(stat, "IO_REPARSE_TAG_MOUNT_POINT", 0xA0000003))


def refuse_links(root: Path, path: Path) -> None:
    """Raise ``PlantedLink`` when ``link_below`` finds one; the job fails, naming it, and nothing is touched."""
    if (link := link_below(root, path)) is not None:
        raise PlantedLink(f"{link} is a link (to {os.path.realpath(link)}); a worker never writes, moves or removes "
                          "through links under the spool's folders. Someone put it there: remove it, then submit the "
                          "job again under a new id")


class PlantedLink(RuntimeError):
    """A link where the worker writes (see ``link_below``)."""


def canonical(value: str) -> str:
    """The one spelling of a share-relative path that ``resolve_in_share`` loads, for comparing names: forward
    slashes, no '.' or empty parts, no trailing slash (``models\\x\\``, ``./models//x`` and ``models/x`` are one)."""
    return PurePosixPath(value.replace("\\", "/")).as_posix()


def resolve_in_share(root: Path, value: str, field: str) -> Path:
    """The real path of ``value`` under ``root``, refusing any that a symlink or '..' takes outside it."""
    if problem := share_path_problem(value):
        raise Rejected(field, problem)
    path = Path(root) / value.replace("\\", "/")
    if real := outside_share(root, path):
        raise Rejected(field, f"{value!r} resolves to {real}, outside the share (a symlink leads out)")
    target = Path(os.path.realpath(path))
    try:
        exists = target.exists()
    except OSError as e:  # a name the share's file system refuses: still the job's input, so a rejection
        raise Rejected(field, f"{value!r} cannot be looked up on the share ({e.strerror or e})") from None
    if not exists:
        raise Rejected(field, f"{value!r} does not exist on the share; copy it there or fix the path")
    return target
