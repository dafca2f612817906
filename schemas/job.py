"""The job file, as a person writes it and drops it into ``SHARE/inbox/``.

Every field but ``kind``, ``base_model`` and ``dataset`` has a default, so the smallest job is three lines.
Unknown fields are refused (``extra="forbid"``) so that a misspelt field is an error, not a silent default.
Paths are relative to the share; ``spooler.paths`` refuses those that could leave it.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A job id becomes a folder name on SMB, NFS and NTFS alike: keep to the characters all three accept,
# and refuse the names Windows reserves whatever their extension.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
ID_RULE = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a job id, or None when it can."""
    if not SAFE_ID.match(value):
        return f"{value!r} is not a safe file name: {ID_RULE}"
    if value.endswith("."):
        return f"{value!r} ends with '.', which Windows drops from folder names"
    if value.split(".")[0].lower() in WINDOWS_RESERVED:
        return f"{value!r} is a name Windows reserves for a device"
    return None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobKind(str, Enum):
    train = "train"
    probe = "probe"


class Quantization(str, Enum):
    none = "none"
    bit8 = "8bit"
    bit4 = "4bit"


class LoraSpec(Strict):
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q_proj", "v_proj"])

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be \"all-linear\"")
        return v


class TrainingSpec(Strict):
    epochs: float = Field(1, gt=0, le=1000)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2e-4, gt=0, le=1)
    batch_size: int = Field(4, ge=1, le=4096)
    max_length: int = Field(512, ge=8, le=131072)
    seed: int = 0
    eval_fraction: float = Field(0.1, gt=0, lt=1)


class JobSpec(Strict):
    """A job as submitted. ``id`` defaults to the file name without ``.json``."""

    id: str | None = None
    kind: JobKind
    base_model: str | None = Field(None, description="Model folder, relative to the share.")
    dataset: str | None = Field(None, description="JSONL file, relative to the share.")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    quantization: Quantization = Quantization.none
    priority: int = Field(0, ge=-1000, le=1000, description="Higher runs first.")

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str | None) -> str | None:
        if v is not None and (problem := id_problem(v)):
            raise ValueError(problem)
        return v

    @field_validator("base_model", "dataset")
    @classmethod
    def _share_relative(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from spooler.paths import share_path_problem  # no import cycle at module load

        if problem := share_path_problem(v):
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _train_needs_inputs(self) -> JobSpec:
        if self.kind is JobKind.train:
            missing = [f for f in ("base_model", "dataset") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"a train job needs {' and '.join(missing)}")
        return self
