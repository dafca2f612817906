"""The clock, passed in rather than read from globals, so tests can hand a worker a skewed one.

Wall time only ever labels records for people. Every decision about time (liveness, settling, throttling)
is made on ``monotonic()``, which no other machine's clock can disturb.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def wall(self) -> float: ...

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class SkewedClock(SystemClock):
    """A machine whose wall clock is ``offset`` seconds off; its monotonic clock is unaffected, as in life."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def wall(self) -> float:
        return time.time() + self.offset


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")


def parse_iso(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def human_age(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0))))
