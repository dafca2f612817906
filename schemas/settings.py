"""``SHARE/loraspool.json``: the settings every worker and submitter on this share reads."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ShareSettings(BaseModel):
    # Unknown keys are ignored, not refused: every machine on the share reads this file, and one still on an
    # older release must go on working after a newer one added a setting (Share.open warns of them, and init
    # keeps them when it rewrites the file).
    model_config = ConfigDict(extra="ignore")

    layout_version: int = 1
    heartbeat_interval: float = Field(2.0, gt=0, le=300, description="Seconds between a worker's heartbeats.")
    stale_after: float = Field(
        15.0, gt=0, description="A worker whose heartbeat seq has not advanced for this long is stale."
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Attempts before a job fails whose worker or training "
                                                          "process died each time.")
    file_mode: str = Field("0664", description="Octal mode for files the system writes (safetensors uses 0600).")
    dir_mode: str = Field("0775", description="Octal mode for folders the system makes.")
    max_job_bytes: int = Field(256 * 1024, ge=1024, description="Larger job files are rejected unread.")
    settle_seconds: float = Field(
        3.0, ge=0, description="An inbox file that fails to parse is only rejected once unchanged this long; ten "
                               "times this long when it looks cut short (its JSON stops at the end of the file)."
    )
    confirm_seconds: float = Field(
        0.3, ge=0, le=10,
        description="After a claim rename or an id mkdir, wait this long and look again before acting: some SMB "
                    "clients (rclone) can tell two racing clients that both won.")
    rescan_interval: float = Field(5.0, gt=0, description="Full rescan of the folders, whatever the watcher saw.")
    poll_interval: float = Field(0.5, gt=0, description="Polling observer period on network filesystems.")
    # An adapter chain's size (base + the version + its ancestors, GB = 10^9 bytes) sets its warning level in
    # `loraspool adapters`: optimal below size_plan_gb, then "consider planning", "merge recommended", "critical".
    size_plan_gb: float = Field(6.0, gt=0, description="Chains from this size on: consider planning.")
    size_merge_gb: float = Field(9.0, gt=0, description="Chains from this size on: merge recommended.")
    size_critical_gb: float = Field(16.0, gt=0, description="Chains from this size on: critical.")
    submit_fallback: Literal["auto", "never"] = Field(
        "auto", description="What `loraspool submit` does when no worker is live, unless its --fallback says: "
                            "auto runs the job on the submitting machine's CPU, never leaves it queued for a worker "
                            "(for a planned stop of the GPU worker).")

    @field_validator("file_mode", "dir_mode")
    @classmethod
    def _octal(cls, v: str) -> str:
        try:
            mode = int(v, 8)
        except ValueError:
            raise ValueError(f"{v!r} is not an octal mode like \"0664\"") from None
        if not 0 <= mode <= 0o777:
            raise ValueError(f"{v!r} is outside 0000-0777")
        return v

    @model_validator(mode="after")
    def _size_levels_rise(self) -> ShareSettings:
        if not self.size_plan_gb <= self.size_merge_gb <= self.size_critical_gb:
            raise ValueError(f"size levels must rise: size_plan_gb ({self.size_plan_gb}) <= size_merge_gb "
                             f"({self.size_merge_gb}) <= size_critical_gb ({self.size_critical_gb})")
        return self

    @model_validator(mode="after")
    def _stale_after_spans_beats(self) -> ShareSettings:
        if self.stale_after < 2 * self.heartbeat_interval:
            raise ValueError(
                f"stale_after ({self.stale_after}s) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}s), or a live worker would look stale between two writes"
            )
        return self
