"""The job file, as a person writes it and drops it into ``SHARE/inbox/``.

Every field but ``kind``, ``base_model`` and ``dataset`` has a default, so the smallest job is three lines.
Unknown fields are refused (``extra="forbid"``) so that a misspelt field is an error, not a silent default.
Paths are relative to the share; ``spooler.paths`` refuses those that could leave it.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

# A job id becomes a folder name on SMB, NFS and NTFS alike: keep to the characters all three accept,
# and refuse the names Windows reserves whatever their extension.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: "$" would let a final newline through
# Windows also reserves COM and LPT with a superscript 1, 2 or 3 (it reads them as the digits).
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", "conin$", "conout$",
                    *(f"{d}{i}" for d in ("com", "lpt") for i in (*range(10), "\u00b9", "\u00b2", "\u00b3"))}
ID_RULE = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
# A probe is a question a person reads the answers to, not a document: this bounds what a job file can make the
# worker generate from (on a rotary model no position table would refuse it), on the CPU fallback too.
PROBE_CHARS = 4000


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
    # No infinities or NaN: JSON has none, but Python's parser reads 1e999 and Infinity, and an infinite lora.alpha
    # trained to a NaN loss that blamed the model files instead of naming the field.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# A registered adapter version, NAME/VERSION: ``support/v2``. The name follows the job id's rule.
ADAPTER_REF = re.compile(r"^(?P<name>[^/\\]+)/(?P<version>v[1-9][0-9]{0,5})\Z")


def ref_problem(value: str) -> str | None:
    """Why ``value`` is not NAME/VERSION of a registered adapter (``support/v2``), or None when it is."""
    m = ADAPTER_REF.match(value)
    if not m:
        return f"{value!r} is not NAME/VERSION of a registered adapter, like \"support/v2\""
    return id_problem(m["name"])


def adapter_arg_problem(value: str) -> str | None:
    """Why ``value`` is neither NAME/VERSION nor a share-relative folder. NAME/vN is always read as a version."""
    if ADAPTER_REF.match(value):
        return ref_problem(value)
    from spooler.paths import share_path_problem  # no import cycle at module load

    return share_path_problem(value)


class JobKind(str, Enum):
    train = "train"
    probe = "probe"
    verify = "verify"
    merge = "merge"


class Quantization(str, Enum):
    none = "none"
    bit8 = "8bit"
    bit4 = "4bit"


class LoraSpec(Strict):
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout. Off by default, as in peft: each LoRA "
                                                       "layer's dropout keeps its own copy of the layer's input "
                                                       "for backward (+27 KiB per token and layer on qwen3-0.6b).")
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
    seed: int = Field(0, ge=-(2**63), lt=2**64, description="Seeds the split, the batches and the LoRA init "
                                                             "(torch.manual_seed's range).")
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
                            "on padding; batch_size then counts sequences. auto and true: packed, unless the "
                            "model would let packed rows see each other (OPT, Falcon, Bloom): then padded, and "
                            "the result's notes say so. false: length-grouped padded batches.")
    compile: bool = Field(False, description="torch.compile the model body (cuda only); compile time is reported.")

    @model_validator(mode="after")
    def _chars_order(self) -> TrainingSpec:
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        return self


class VerifySpec(Strict):
    """What a ``kind: "verify"`` job checks: one adapter, or every version of a name and their links."""

    adapter: str | None = Field(None, description="NAME/VERSION of a registered adapter, or an adapter folder "
                                                  "relative to the share (one made elsewhere needs no manifest).")
    chain: str | None = Field(None, description="An adapter name: verify every version and every parent link.")
    eval_tolerance: float = Field(0.05, gt=0, le=10, description="With a dataset: the eval loss may differ from "
                                                                 "the manifest's by this fraction of it.")
    rehash_base: bool = Field(False, description="Hash the base model's files again instead of trusting the "
                                                 "cached hashes (size and mtime unchanged).")

    @model_validator(mode="after")
    def _one_target(self) -> VerifySpec:
        if (self.adapter is None) == (self.chain is None):
            raise ValueError("give exactly one of \"adapter\" (NAME/VERSION or a folder) or \"chain\" (NAME)")
        if self.adapter is not None and (problem := adapter_arg_problem(self.adapter)):
            raise ValueError(f"adapter: {problem}")
        if self.chain is not None and (problem := id_problem(self.chain)):
            raise ValueError(f"chain: {problem}")
        return self


Combination = Literal["linear", "cat", "svd", "ties", "dare_linear"]


class MergeSpec(Strict):
    """What a ``kind: "merge"`` job makes. Its inputs are never changed: the result is a new folder."""

    adapters: list[str] = Field(min_length=1, max_length=8, description="NAME/VERSION of each input adapter.")
    into: Literal["base", "adapter"] = Field(
        description="base: merge_and_unload one adapter into its base, saved as a new model folder. adapter: "
                    "combine several adapters into one new registered version (peft add_weighted_adapter).")
    combination: Combination = Field(
        "cat", description="into adapter: cat (exact sum, rank = sum of ranks), svd (the sum cut to the largest "
                           "rank), linear (same rank only; averages A and B, rough), ties, dare_linear (same rank).")
    weights: list[FiniteFloat] | None = Field(None, description="One per adapter (into adapter); default 1.0 each.")
    density: float | None = Field(None, gt=0, le=1, description="ties and dare_linear: the fraction of each "
                                                                "update kept (default 0.5).")
    output: str | None = Field(None, description="into base: the model folder to create, relative to the share "
                                                 "and under models/; default models/merged/<name>-<version>. It "
                                                 "must not exist.")

    @field_validator("adapters")
    @classmethod
    def _refs(cls, v: list[str]) -> list[str]:
        for ref in v:
            if problem := ref_problem(ref):
                raise ValueError(problem)
        if len(set(v)) != len(v):
            raise ValueError("names one adapter twice")
        return v

    @field_validator("output")
    @classmethod
    def _output_path(cls, v: str | None) -> str | None:
        from spooler.paths import canonical, share_path_problem  # no import cycle at module load

        if v is not None and (problem := share_path_problem(v)):
            raise ValueError(problem)
        if v is not None and not canonical(v).startswith("models/"):  # not into results/, adapters/, queue/...
            raise ValueError(f"{v!r} is not under models/; a merged model is a model folder, like "
                             "\"models/merged/my-model\"")
        return v

    @model_validator(mode="after")
    def _shape(self) -> MergeSpec:
        n = len(self.adapters)
        if self.into == "base":
            if n != 1:
                raise ValueError(f"into \"base\" merges exactly one adapter, got {n}; merge them into one adapter "
                                 "first (into \"adapter\")")
            if self.weights is not None or self.density is not None:
                raise ValueError("weights and density are for into \"adapter\"")
            return self
        if n < 2:
            raise ValueError("into \"adapter\" combines at least two adapters; to fold one into its base use "
                             "into \"base\"")
        if self.output is not None:
            raise ValueError("output is for into \"base\"; a merged adapter is registered (see register_as)")
        if self.weights is not None and len(self.weights) != n:
            raise ValueError(f"weights has {len(self.weights)} entries for {n} adapters")
        if self.density is not None and self.combination not in ("ties", "dare_linear"):
            raise ValueError(f"density is for ties and dare_linear, not {self.combination}")
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
    probes: list[Annotated[str, StringConstraints(max_length=PROBE_CHARS)]] = Field(
        default_factory=list, max_length=8,
        description=f"Up to 8 prompts of {PROBE_CHARS} characters at most, answered greedily by the base and the "
                    "adapted model.")
    devices: Literal["auto", "all"] = Field(
        "auto", description="auto: one GPU (or the CPU). all: one job across every GPU of the worker (DDP).")
    parent: str | None = Field(
        None, description="train: NAME/VERSION of a registered adapter to continue training (its LoRA shape "
                          "wins over lora).")
    register_as: str | None = Field(
        None, description="train, merge into adapter: the adapter name to register the result under, as its "
                          "next version. Default: the parent's name (or the first input's), else the job id.")
    verify: VerifySpec | None = Field(None, description="kind verify: what to check.")
    merge: MergeSpec | None = Field(None, description="kind merge: what to merge, and into what.")

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

    @field_validator("parent")
    @classmethod
    def _parent_ref(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            if info.data.get("kind") not in (JobKind.train, None):
                raise ValueError("only a train job continues from a parent")
            if problem := ref_problem(v):
                raise ValueError(problem)
        return v

    @field_validator("register_as")
    @classmethod
    def _register_name(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            if info.data.get("kind") not in (JobKind.train, JobKind.merge, None):
                raise ValueError("only train and merge jobs register an adapter")
            if problem := id_problem(v):
                raise ValueError(problem)
        return v

    @field_validator("verify", "merge")
    @classmethod
    def _block_of_kind(cls, v: BaseModel | None, info: ValidationInfo) -> BaseModel | None:
        kind = info.data.get("kind")
        if v is not None and kind is not None and kind.value != info.field_name:
            raise ValueError(f"is for kind \"{info.field_name}\", not {kind.value!r}")
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
        for kind, example in ((JobKind.verify, '{"adapter": "support/v2"}'),
                              (JobKind.merge, '{"adapters": ["support/v2"], "into": "base"}')):
            if self.kind is kind and getattr(self, kind.value) is None:
                raise ValueError(f"{kind.value}: is required for a {kind.value} job, e.g. {example}")
        if self.merge is not None and self.merge.into == "base" and self.register_as is not None:
            raise ValueError("register_as: a merge into the base makes a model folder (merge.output), not an "
                             "adapter version")
        return self
