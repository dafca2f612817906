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
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): slower steps, often better quality.")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. lm_head), by name.")

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
    min_chars: int = Field(0, ge=0, description="Drop rows whose text (all fields together) is shorter than this.")
    max_chars: int | None = Field(None, ge=1, description="Drop rows whose text is longer than this.")
    skip_bad_rows: bool = Field(False, description="Count malformed dataset lines instead of rejecting the job.")
    checkpoint_every_steps: int = Field(
        200, ge=1, description="Checkpoint to the share after this many optimizer steps or checkpoint_every_minutes, "
                               "whichever comes first: a crash costs at most one interval.")
    checkpoint_every_minutes: float = Field(10.0, gt=0, description="See checkpoint_every_steps.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations in backward: less memory, ~30% slower. auto: only when the "
                            "memory estimate says the batch would not fit.")
    packing: bool | Literal["auto"] = Field(
        "auto", description="Pack rows into full max_length sequences (attention never crosses rows): no compute "
                            "on padding. auto: on for cuda, off on CPU.")
    compile: bool = Field(False, description="torch.compile the model body (cuda only); compile time is reported.")

    @model_validator(mode="after")
    def _chars_order(self) -> TrainingSpec:
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        return self


class JobSpec(Strict):
    """A job as submitted. ``id`` defaults to the file name without ``.json``."""

    id: str | None = None
    kind: JobKind
    base_model: str | None = Field(None, description="Model folder, relative to the share.")
    dataset: str | list[str] | None = Field(
        None, description="JSONL file, or a list of them (combined), relative to the share.")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    quantization: Quantization = Quantization.none
    priority: int = Field(0, ge=-1000, le=1000, description="Higher runs first.")
    probes: list[str] = Field(default_factory=list, max_length=8,
                              description="Up to 8 prompts, answered greedily by the base and the adapted model.")
    devices: Literal["auto", "all"] = Field(
        "auto", description="auto: one GPU (or the CPU). all: one job across every GPU of the worker (DDP).")

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str | None) -> str | None:
        if v is not None and (problem := id_problem(v)):
            raise ValueError(problem)
        return v

    @field_validator("base_model", "dataset")
    @classmethod
    def _share_relative(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is None:
            return v
        from spooler.paths import share_path_problem  # no import cycle at module load

        if isinstance(v, list) and not v:
            raise ValueError("must name at least one file")
        for path in [v] if isinstance(v, str) else v:
            if problem := share_path_problem(path):
                raise ValueError(problem)
        return v

    def dataset_files(self) -> list[str]:
        """The dataset as a list, whichever form the job used."""
        return [] if self.dataset is None else [self.dataset] if isinstance(self.dataset, str) else self.dataset

    @model_validator(mode="after")
    def _train_needs_inputs(self) -> JobSpec:
        if self.kind is JobKind.train:
            missing = [f for f in ("base_model", "dataset") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"a train job needs {' and '.join(missing)}")
        return self
