"""Outcomes that could not be written to the share, kept on this machine's disk until they are delivered.

A job can finish while the share is away (server reboot, dropped mount). Its result must not be lost, and
the job must not run again once the share is back: the outcome waits here, keyed by the running file's
name, and the daemon concludes from it before it would run the job a second time. These files are the
worker's own records, so it removes each one once the share holds the result.
"""

from __future__ import annotations

import logging
from pathlib import Path

from schemas.result import Result
from spooler import atomic

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, running_name: str) -> Path:
        return self.folder / f"{running_name}.result.json"

    def keep(self, running_name: str, result: Result) -> bool:
        """Keep ``result`` locally. False if even the local disk refused it (the job then runs again)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self._path(running_name), result)
            return True
        except Exception as e:  # OSError, or a result that cannot be written at all: never the worker's end
            log.error("outcome of job %s not kept locally in %s either: %s; the job will run again",
                      result.id, self.folder, e)
            return False

    def kept(self, running_name: str) -> Result | None:
        try:
            return Result.model_validate_json(self._path(running_name).read_bytes())
        except (OSError, ValueError):
            return None

    def delivered(self, running_name: str) -> None:
        try:
            self._path(running_name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:  # harmless: the next delivery finds the result already there
            log.warning("local copy %s of a delivered outcome not removed: %s", self._path(running_name), e)
