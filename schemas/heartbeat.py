"""``SHARE/heartbeats/<worker-id>.json``, rewritten atomically every ``heartbeat_interval`` seconds.

Liveness comes from ``seq`` advancing, timed on the observer's own monotonic clock, never from ``written_at``:
that is the writer's wall clock, kept only for people to read.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class WorkerState(str, Enum):
    starting = "starting"
    idle = "idle"
    busy = "busy"
    paused = "paused"
    stopping = "stopping"
    stopped = "stopped"


class GpuInfo(BaseModel):
    index: int
    name: str
    utilization_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None


class Progress(BaseModel):
    """How far a training attempt is. Written by the training process, copied into the heartbeat."""

    job: str
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    tokens: int | None = Field(None, description="Non-padding tokens trained on so far (across resumed attempts).")
    padded_tokens: int | None = Field(None, description="Tokens computed on so far, padding included.")
    phase: str = Field(
        "starting", description="copying (the base model to the local cache), loading, preparing (reading and "
                                "tokenizing the dataset), eval-before, training, "
                                "eval-after, saving, verifying; merging for merge jobs; finished once the job has "
                                "its result. A worker ends a job silent for its stall_minutes in copying, preparing, "
                                "eval-* or training.")


class Heartbeat(BaseModel):
    worker: str
    seq: int = Field(description="Increases by one per write; observers time its advance on their own clock.")
    interval: float = Field(description="Seconds between writes, as this worker was configured.")
    state: WorkerState
    host: str
    pid: int
    device: str
    fallback: bool = False
    written_at: str = Field(description="The writer's wall clock (ISO 8601). Informational only.")
    gpus: list[GpuInfo] = Field(default_factory=list)
    cpu_pct: float | None = None
    ram_used_bytes: int | None = None
    ram_total_bytes: int | None = None
    job: str | None = None
    progress: Progress | None = None
    version: str = Field("unknown", description="The loraspool release the worker runs (`loraspool --version`): "
                                                "which machines an upgrade has reached.")
