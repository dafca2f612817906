"""Errors that decide a job's terminal state."""

from __future__ import annotations

from typing import Any


class Rejected(Exception):  # noqa: N818 - the name is the job state it leads to
    """Bad input: the job ends ``rejected`` with a message that names the field and the problem."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ClaimLost(Exception):  # noqa: N818
    """This worker no longer holds the job: a reaper requeued it while we looked dead. Drop the outcome."""


class Cancelled(Exception):  # noqa: N818
    """A person asked to cancel the job (``loraspool cancel``); the training loop stops at its next step."""


class DeviceUnavailable(RuntimeError):
    """The worker's GPU cannot be used (a driver update broke CUDA under a running worker): no job's fault. The
    job goes back to the queue, its attempt not counted, and the worker stops rather than fail the next one."""


def validation_problems(errors: list[Any]) -> str:
    """pydantic's ``e.errors()`` as one line a person reads: "where: what", where is not already said."""
    out = []
    for err in errors:
        msg, where = err["msg"].removeprefix("Value error, "), ".".join(str(x) for x in err["loc"])
        out.append(f"{where}: {msg}" if where and where not in msg else msg)
    return "; ".join(out)


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's text cut to its first line, "" when it has none: torch's dispatcher errors run to pages,
    and a note or a result names a problem in one line."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else ""


def brief(e: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of an exception; an exception with no text at all (``KeyError()``) names its type."""
    first = first_line(e, limit)
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
