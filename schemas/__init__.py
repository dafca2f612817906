"""Pydantic models of every record on the share. ``python -m schemas.export`` writes them as JSON Schema."""

from schemas.heartbeat import GpuInfo, Heartbeat, Progress, WorkerState
from schemas.job import JobKind, JobSpec, LoraSpec, Quantization, TrainingSpec
from schemas.result import AdapterInfo, Metrics, Result, Terminal
from schemas.settings import ShareSettings

__all__ = [
    "AdapterInfo", "GpuInfo", "Heartbeat", "JobKind", "JobSpec", "LoraSpec", "Metrics", "Progress",
    "Quantization", "Result", "ShareSettings", "Terminal", "TrainingSpec", "WorkerState",
]
