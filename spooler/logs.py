"""Logging: readable lines to stderr for a person, JSON lines to a rotated file for grep, jq and log shippers.

The daemon writes its job and worker ids into the text ("job X claimed, attempt 1 [worker W]"), so a person
reading stderr sees them. The JSON file gets them as fields too: from ``extra={"job": ..., "worker": ...}``
when a caller passes them, otherwise parsed from that fixed wording.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from logging.handlers import RotatingFileHandler
from pathlib import Path

TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
JOB_AT_START = re.compile(r"^job ([A-Za-z0-9][A-Za-z0-9._-]*)")
WORKER_AT_START = re.compile(r"^worker ([A-Za-z0-9][A-Za-z0-9._-]*)")
WORKER_TAG = re.compile(r"\[worker ([A-Za-z0-9][A-Za-z0-9._-]*)\]")
# Attributes every LogRecord has; anything else on a record came from extra= and is worth keeping.
STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_MARK = "_loraspool_handler"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, job, worker, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc: dict[str, object] = ids_in(message)  # extra= wins over parsing, the core fields over both
        for key, value in vars(record).items():
            if key not in STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
        core = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        doc = {**core, **{k: v for k, v in doc.items() if k not in core}}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def ids_in(message: str) -> dict[str, str]:
    """The job and worker ids the daemon's wording puts in a message ("job X ...", "worker W ...", "[worker W]")."""
    ids = {}
    if m := JOB_AT_START.match(message):
        ids["job"] = m.group(1)
    if m := WORKER_TAG.search(message) or WORKER_AT_START.match(message):
        ids["worker"] = m.group(1)
    return ids


QUIET_LIBRARIES = ("watchdog", "filelock", "urllib3", "fsspec")


def setup_logging(verbose: bool = False, log_file: Path | None = None, max_bytes: int = 10 * 1024 * 1024,
                  backups: int = 5) -> str | None:
    """(Re)configure the root logger: stderr always, ``log_file`` when given. Safe to call twice: the second
    call (once the worker's settings are known) replaces the handlers the first one added.

    Returns None, or why the file could not be opened: logging to stderr must never stop a worker from
    starting, and journald or the service log keeps stderr anyway.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for chatty in QUIET_LIBRARIES:  # their DEBUG is one line per file event: -v is for loraspool's own lines
        logging.getLogger(chatty).setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(TEXT_FORMAT))
    _add(root, console)
    if log_file is None:
        return None
    try:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    except OSError as e:
        problem = (f"cannot write the log file {log_file} ({e}); logging to stderr only: fix log_file in "
                   "loraspool.toml or let the worker's account write that folder")
        logging.getLogger(__name__).warning(problem)
        return problem
    handler.setFormatter(JsonFormatter())
    _add(root, handler)
    return None


def _add(root: logging.Logger, handler: logging.Handler) -> None:
    setattr(handler, _MARK, True)
    root.addHandler(handler)
