"""The share: where every folder lives, and the share-wide settings. Passed to everything that touches it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from schemas.settings import ShareSettings
from spooler import atomic
from spooler.errors import brief, validation_problems

log = logging.getLogger(__name__)

SETTINGS_FILE = "loraspool.json"
FOLDERS = ("inbox", "intake", "queue", "running", "results", "cancel", "heartbeats", "tmp", "models", "datasets")
# Tokenized dataset rows (worker/tokencache.py): only a cache, so gc may remove it whole when a person names it.
TOKEN_CACHE = "datasets/.tokens"

M = TypeVar("M", bound=BaseModel)


class ShareUnavailable(OSError):
    """The share went away (unmounted, server down, permission lost). Workers wait for it to come back."""


class ShareError(Exception):
    """The share is missing, not initialised, or its settings are bad. The message says what to run."""


@dataclass
class Share:
    root: Path
    settings: ShareSettings

    @classmethod
    def open(cls, root: Path | str) -> Share:
        root = Path(root)
        path = root / SETTINGS_FILE
        if not path.is_file():
            # On a network drive that is not mounted, "init" would build a second share on the local disk.
            raise ShareError(f"{root} is not a loraspool share (no {SETTINGS_FILE}). If it is on a network drive, "
                             f"check that the drive is mounted; to make a new share there: loraspool init {root}")
        raw = path.read_bytes()
        try:
            settings = ShareSettings.model_validate_json(raw)
        except ValidationError as e:
            raise ShareError(f"{path} has bad settings: {e}; fix the file or rerun loraspool init") from e
        if settings.layout_version > LAYOUT_VERSION:  # its folders may mean other things: never guess
            raise ShareError(f"{path} says layout_version {settings.layout_version}, newer than this loraspool "
                             f"knows ({LAYOUT_VERSION}): upgrade loraspool on this machine")
        if unknown := sorted(set(json.loads(raw)) - set(ShareSettings.model_fields)):
            log.warning("%s: settings %s are unknown to this loraspool and ignored (a newer release wrote them, "
                        "or they are misspelt)", path, ", ".join(unknown))
        return cls(root, settings)

    # Folders. Each is one state or one kind of record; share-layout.md explains them.
    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def cancel(self) -> Path:
        return self.root / "cancel"

    @property
    def heartbeats(self) -> Path:
        return self.root / "heartbeats"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def intake(self, worker: str) -> Path:
        return self.root / "intake" / worker

    def running(self, worker: str) -> Path:
        return self.root / "running" / worker

    def result_dir(self, job_id: str) -> Path:
        return self.results / job_id

    def heartbeat_file(self, worker: str) -> Path:
        return self.heartbeats / f"{worker}.json"

    def cancel_file(self, job_id: str) -> Path:
        return self.cancel / f"{job_id}.json"

    @property
    def file_mode(self) -> int:
        return int(self.settings.file_mode, 8)

    @property
    def dir_mode(self) -> int:
        return int(self.settings.dir_mode, 8)

    def reachable(self) -> bool:
        """The settings file is there. A network drive that dropped leaves a bare mount point (or an error) where
        the share was, and a spool that looks empty then must not be taken for one that is."""
        try:
            return (self.root / SETTINGS_FILE).is_file()
        except OSError:
            return False

    def makedirs(self, path: Path) -> Path:
        if not path.is_dir():
            if not self.reachable():
                # An unmounted share leaves an empty mount point: never build a second share on the local disk.
                raise ShareUnavailable(f"{self.root} is not reachable (no {SETTINGS_FILE}); is the share mounted?")
            atomic.makedirs(path, self.dir_mode)
        return path

    def write_json(self, target: Path, record: BaseModel | dict) -> bytes:
        return atomic.write_json(target, record, self.file_mode)

    def write_bytes(self, target: Path, data: bytes) -> None:
        atomic.write_bytes(target, data, self.file_mode)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def read_model(path: Path, model: type[M]) -> M | None:
    """A record, or None when it is missing or half-visible (an NFS client may briefly show neither)."""
    try:
        return model.model_validate_json(path.read_bytes())
    except (OSError, ValidationError, ValueError):
        return None


# Settings added after the first release: written only when a person set them (or they were in the file), so
# that machines still on a release that refuses keys it does not know keep reading the file.
WRITTEN_WHEN_SET = ("submit_fallback",)
LAYOUT_VERSION = 1  # the share layout this release reads and writes (share-layout.md)


def _as_written(settings: ShareSettings, current: dict) -> dict:
    """The file's contents: a newer release's keys kept as they were, newer settings of ours only when set."""
    unknown = {k: v for k, v in current.items() if k not in ShareSettings.model_fields}
    ours = {k: v for k, v in settings.model_dump(mode="json").items()
            if k not in WRITTEN_WHEN_SET or k in current}
    return {**unknown, **ours}


def init_share(root: Path | str, **overrides: float | int | str) -> Share:
    """Create the layout and write the settings. Idempotent: existing settings are kept unless overridden."""
    root = Path(root)
    path = root / SETTINGS_FILE
    current: dict = {}
    if os.path.lexists(path):
        # A person's settings: one that cannot be read or parsed is refused, never replaced by the defaults (audit,
        # proven: a trailing comma reset max_attempts and stale_after, and dropped the team's own keys).
        try:
            current = json.loads(path.read_bytes())
        except (ValueError, OSError) as e:
            raise ShareError(f"{path} cannot be read as JSON ({brief(e)}); it was left as it is: fix it by "
                             "hand (or move it away to start from the defaults), then run this again") from None
        if not isinstance(current, dict):
            raise ShareError(f"{path} holds a JSON {type(current).__name__}, not an object of settings; it was left "
                             "as it is: fix it by hand (or move it away to start from the defaults), then run this "
                             "again")
    current.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = ShareSettings.model_validate(current)
    except ValidationError as e:
        raise ShareError(f"bad share settings: {validation_problems(e.errors())} (from the flags, or {path})") from e
    root.mkdir(parents=True, exist_ok=True)  # after the settings are known good: a refused init leaves nothing
    share = Share(root, settings)
    if read_model(path, ShareSettings) != settings:
        share.write_json(path, _as_written(settings, current))
    for name in FOLDERS:
        share.makedirs(root / name)
    return share
