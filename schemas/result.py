"""The one terminal record of a job: ``SHARE/results/<id>/result.json``."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class Terminal(str, Enum):
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    rejected = "rejected"


class Metrics(BaseModel):
    train_loss: float | None = None
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    tokens: int | None = Field(None, description="Non-padding tokens trained on.")
    seconds: float | None = Field(None, description="Wall seconds of the training attempt that finished.")
    steps: int | None = None


class AdapterInfo(BaseModel):
    path: str = Field(description="Folder of the PEFT adapter, relative to the share.")
    files: dict[str, str] = Field(description="File name -> sha256 hex digest.")
    size_bytes: int


class Result(BaseModel):
    id: str
    status: Terminal
    error: str | None = Field(None, description="What went wrong and what to do about it; null on success.")
    kind: str | None = None
    worker: str | None = None
    host: str | None = None
    device: str | None = Field(None, description="cuda or cpu; null when no worker ran it.")
    fallback: bool = Field(False, description="True when the submitter's local CPU worker ran it.")
    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    metrics: Metrics = Field(default_factory=Metrics)
    adapter: AdapterInfo | None = None
    notes: list[str] = Field(default_factory=list, description="Things a person should know, e.g. a downgrade.")
    source_file: str | None = Field(None, description="The inbox file name the job arrived as.")
