"""``results/<id>/attempts/<attempt>/checkpoints/step-<N>/state.json``: where a killed job picks up.

The folder beside it holds the adapter (``adapter_model.safetensors``), the optimizer and scheduler
(``optimizer.pt``, plain tensors loaded with ``weights_only=True``) and the RNG states (``rng.pt``). A checkpoint
folder is complete only once this file is in it: it is written last, inside a folder that is renamed into
place, so a half-written checkpoint is never picked.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class CheckpointState(BaseModel):
    step: int = Field(description="Optimizer steps done; training resumes at step + 1.")
    total_steps: int
    epoch: int = Field(description="The data epoch the next batch comes from.")
    batch_in_epoch: int = Field(description="Batches of that epoch already trained on.")
    tokens: int = Field(description="Non-padding tokens trained on so far, across attempts.")
    padded_tokens: int = 0
    world_size: int = Field(1, description="Processes that trained (DDP); the data order depends on it.")
    fingerprint: str = Field(description="sha256 of what fixes the run (dataset, model, LoRA and training "
                                         "settings); a checkpoint of another run is never resumed.")
    recent_losses: list[float] = Field(default_factory=list, description="The last steps' losses, for train_loss.")
    written_by: str | None = Field(None, description="The attempt folder that wrote it.")


class MetricsLine(BaseModel):
    """One line of ``results/<id>/metrics.jsonl``: a train step (``loss``) or an evaluation (``eval_loss``)."""

    step: int
    kind: str = Field(description="train | eval")
    loss: float | None = None
    eval_loss: float | None = None
    lr: float | None = None
    epoch: float | None = None
    tokens: int | None = None
    tokens_per_second: float | None = None
    grad_norm: float | None = None
    phase: str | None = Field(None, description="For evals: before | after | during.")
