"""Worker settings, merged in one place: flags over environment over defaults.

The share-wide settings (heartbeat interval, stale-after, ...) live on the share itself, so every worker and
submitter agrees on them; see ``schemas.settings``. These are the per-machine ones.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from schemas.job import id_problem

ENV = {"share": "LORASPOOL_SHARE", "id": "LORASPOOL_WORKER_ID", "device": "LORASPOOL_DEVICE",
       "watch": "LORASPOOL_WATCH"}


class ConfigError(Exception):
    pass


class WorkerSettings(BaseModel):
    share: Path
    id: str = Field(description="Worker id: names its heartbeat and running/ folder. Default: the host name.")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    watch: Literal["auto", "native", "polling"] = "auto"
    fallback: bool = Field(False, description="Run by a submitter because no worker was live.")
    only_job: str | None = Field(None, description="Claim only this job, and exit once it has a result.")

    @field_validator("id")
    @classmethod
    def _safe(cls, v: str) -> str:
        if problem := id_problem(v):
            raise ValueError(problem)
        return v


def default_worker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]).strip("-._") or "worker"
    return host[:64]


def resolve(flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> tuple[WorkerSettings, dict[str, str]]:
    """Merge flags (None = not given) over ``LORASPOOL_*`` variables over defaults; also say where each came from."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in WorkerSettings.model_fields:
        if flags.get(name) is not None:
            values[name], sources[name] = flags[name], "flag"
        elif name in ENV and env.get(ENV[name]):
            values[name], sources[name] = env[ENV[name]], f"env {ENV[name]}"
    if "share" not in values:
        raise ConfigError("no share given: pass --share PATH or set LORASPOOL_SHARE")
    if "id" not in values:
        values["id"], sources["id"] = default_worker_id(), "host name"
    try:
        return WorkerSettings.model_validate(values), sources
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"bad worker settings: {problems}") from None
