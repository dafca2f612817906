"""The adapter registry's records: ``SHARE/adapters/<name>/<version>/manifest.json``, and the reports that
``loraspool adapters`` and ``gc`` print. Verify and compat reports are in ``schemas.verify``.

A manifest is written once, inside a temp folder that is renamed into place, and never changed after: it is
the claim an adapter is checked against, so it must not move under the adapter.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field

from schemas.job import TrainingSpec
from schemas.result import Metrics

MANIFEST = "manifest.json"


class FileEntry(BaseModel):
    sha256: str
    size: int


class BaseIdentity(BaseModel):
    """Which base model an adapter belongs to: its folder, and a hash of what makes it that model."""

    path: str = Field(description="The model folder, relative to the share.")
    sha256: str = Field(description="sha256 over the sorted (file name, file sha256) pairs of config.json and the "
                                    "weight files (*.safetensors and their index); the tokenizer does not count.")
    files: dict[str, FileEntry] = Field(default_factory=dict, description="The hashed files.")
    size_bytes: int = Field(0, description="Bytes of the hashed files: what the base costs on disk and in memory.")


class CachedHash(BaseModel):
    size: int
    mtime_ns: int
    sha256: str


class BaseHashCache(BaseModel):
    """``SHARE/adapters/.base-hashes/<key>.json``: a base model's file hashes with the size and mtime they were
    taken at, so an 8 GB base is read once, not at every registration or verify, on any machine."""

    path: str = Field(description="The model folder, relative to the share.")
    files: dict[str, CachedHash] = Field(default_factory=dict)


class LoraShape(BaseModel):
    target_modules: list[str] | str = Field(description="As peft saved them: a list of names, or a regex.")
    r: int
    alpha: float
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    quantization: str = Field("none", description="How the base was loaded to train it: none, 8bit or 4bit.")


class DatasetInfo(BaseModel):
    files: list[str] = Field(default_factory=list, description="Relative to the share.")
    sha256: str | None = None
    train_rows: int = 0
    eval_rows: int = 0


class MergeInfo(BaseModel):
    """How a merged adapter was made from its parents (``kind: "merge"``, ``into: "adapter"``)."""

    combination: str
    weights: list[float]
    density: float | None = None


class Manifest(BaseModel):
    name: str
    version: str = Field(description="v1, v2, ...: the folder's name.")
    origin: str = Field(description="train | merge: how the adapter was made.")
    job_id: str | None = Field(None, description="The job that made it; null when registered by hand.")
    created_at: str
    token: str = Field(description="Random id of the registration that wrote this version. Read back after the "
                                   "rename that publishes it, to confirm that rename won (some SMB clients report "
                                   "success to both sides of a race).")
    files: dict[str, FileEntry] = Field(description="Every file of the adapter but this manifest.")
    size_bytes: int
    base: BaseIdentity
    lora: LoraShape
    dataset: DatasetInfo | None = None
    training: TrainingSpec | None = Field(None, description="The job's training settings: with the dataset they "
                                                            "rebuild the same eval split, for `verify --dataset`.")
    metrics: Metrics | None = None
    parents: list[str] = Field(default_factory=list, description="NAME/VERSION of each adapter it was trained on "
                                                                 "top of (one), or merged from (several).")
    merge: MergeInfo | None = None
    notes: list[str] = Field(default_factory=list)


class MergedModel(BaseModel):
    """``manifest.json`` of a model folder made by merging an adapter into its base (``merge_and_unload``)."""

    created_at: str
    job_id: str | None = None
    adapter: str = Field(description="NAME/VERSION merged in, or the folder when it was not registered.")
    adapter_files: dict[str, FileEntry] = Field(default_factory=dict)
    base: BaseIdentity
    files: dict[str, FileEntry] = Field(description="Every file of the merged model but this manifest.")
    size_bytes: int
    dtype: str = Field(description="The dtype the weights were saved in (the base's own).")
    max_logit_diff: float = Field(description="Largest |logit| difference between adapter-on-base and the saved "
                                              "merged model on the probe inputs.")
    tolerance: float
    notes: list[str] = Field(default_factory=list)


class SizeLevel(str, Enum):
    optimal = "optimal"
    plan = "consider planning"
    merge = "merge recommended"
    critical = "critical"


class VersionNode(BaseModel):
    ref: str = Field(description="NAME/VERSION.")
    origin: str
    job_id: str | None = None
    created_at: str | None = None
    size_bytes: int
    chain_bytes: int = Field(description="The base plus this version and every ancestor: what keeping it costs.")
    level: SizeLevel
    eval_loss: float | None = None
    parents: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    children: list[VersionNode] = Field(default_factory=list)


class BaseNode(BaseModel):
    path: str
    sha256: str
    size_bytes: int
    versions: list[VersionNode] = Field(default_factory=list, description="Versions with no parent on this base.")


class MergedNode(BaseModel):
    """A merged model folder found under ``models/``: what it holds and what keeping it costs."""

    path: str = Field(description="Share-relative folder.")
    adapter: str = Field(description="NAME/VERSION merged in, or the adapter folder when it was not registered.")
    base: str = Field(description="The base model's share-relative folder.")
    size_bytes: int
    dtype: str
    created_at: str
    job_id: str | None = None


class AdapterList(BaseModel):
    """``loraspool adapters --json``: the registry as a tree, base models at the roots, then merged models."""

    bases: list[BaseNode] = Field(default_factory=list)
    merged: list[MergedNode] = Field(default_factory=list, description="Merged model folders under models/.")
    warnings: list[str] = Field(default_factory=list)


class GcReport(BaseModel):
    """``loraspool gc``: what could go, what must stay and why, and (with --apply) what went."""

    removable: list[str] = Field(default_factory=list, description="Versions no rule keeps.")
    kept: dict[str, str] = Field(default_factory=dict, description="NAME/VERSION -> why it stays.")
    removed: list[str] = Field(default_factory=list)
    refused: dict[str, str] = Field(default_factory=dict, description="Asked for, not removed: why.")
    freed_bytes: int = 0
    finished: list[str] = Field(default_factory=list, description="Removals an earlier gc decided and did not "
                                                                  "finish (it was stopped), finished.")
    token_cache_bytes: int = Field(0, description="Bytes in datasets/.tokens (tokenized rows, only a cache), "
                                                  "before any removal.")
