"""The one terminal record of a job: ``SHARE/results/<id>/result.json``."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field

from schemas.verify import ChainReport, VerifyReport


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
    steps: int | None = Field(None, description="Optimizer steps in all, across resumed attempts.")
    eval_perplexity_before: float | None = None
    eval_perplexity_after: float | None = None
    padded_tokens: int | None = Field(None, description="Tokens computed on, padding included.")
    compile_seconds: float | None = Field(None, description="torch.compile time, when training.compile is on.")


class DataReport(BaseModel):
    """What dataset refinement did, step by step, so a person can see why fewer rows trained than they gave."""

    files: list[str] = Field(default_factory=list, description="The dataset files, relative to the share.")
    sha256: str | None = Field(None, description="sha256 over the dataset files' bytes, in order.")
    rows_read: int = 0
    bad_rows: int = Field(0, description="Malformed lines skipped (training.skip_bad_rows).")
    empty: int = Field(0, description="Rows with no text left after stripping whitespace.")
    duplicates: int = Field(0, description="Exact duplicates of an earlier row, dropped.")
    too_short: int = Field(0, description="Dropped by training.min_chars.")
    too_long: int = Field(0, description="Dropped by training.max_chars.")
    truncated: int = Field(0, description="Rows cut to training.max_length tokens (kept).")
    no_response: int = Field(0, description="Rows dropped because truncation left no response to learn.")
    train_rows: int = 0
    eval_rows: int = 0
    tokens_cached: int = Field(0, description="Rows whose tokens came from datasets/.tokens/ (an earlier job on the "
                                              "same dataset and tokenizer) instead of being tokenized again.")


class ProbeOutput(BaseModel):
    prompt: str
    base: str = Field(description="The base model's greedy answer.")
    adapted: str = Field(description="The adapted model's greedy answer.")


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
    resumed_from_step: int | None = Field(
        None, description="The checkpoint step the finishing attempt started from; null when it started fresh.")
    data: DataReport | None = None
    probes: list[ProbeOutput] = Field(default_factory=list)
    source_file: str | None = Field(None, description="The inbox file name the job arrived as.")
    registered: str | None = Field(None, description="NAME/VERSION the job's adapter was registered as under "
                                                     "adapters/ (train jobs, merges into an adapter).")
    merged_model: str | None = Field(None, description="The model folder a merge into the base made, relative to "
                                                       "the share.")
    verify: VerifyReport | None = Field(None, description="A verify job's checks (one adapter).")
    verify_chain: ChainReport | None = Field(None, description="A verify job's checks (a whole chain).")

