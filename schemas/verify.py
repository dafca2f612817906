"""What ``loraspool verify`` and ``compat`` find: every check with pass, fail or skip and the reason.

Kept apart from ``schemas.adapter`` because ``result.json`` carries a verify job's report, and the result
schema must not import the registry's records (they import its ``Metrics``).
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class CheckStatus(str, Enum):
    passed = "pass"
    failed = "fail"
    skipped = "skip"


class Check(BaseModel):
    name: str
    status: CheckStatus
    reason: str


class VerifyReport(BaseModel):
    target: str = Field(description="NAME/VERSION, or the folder checked.")
    base: str | None = Field(None, description="The base model folder the load checks used.")
    ok: bool = Field(description="True only when no check failed.")
    checks: list[Check] = Field(default_factory=list)


class ChainReport(BaseModel):
    name: str
    ok: bool
    versions: list[VerifyReport] = Field(default_factory=list)
    links: list[Check] = Field(default_factory=list, description="One per parent link: the parent exists, shares "
                                                                  "the base, and is older.")


class CompatReport(BaseModel):
    a: str
    b: str
    combination: str
    compatible: bool
    risk: int = Field(ge=0, le=100, description="Merge risk: 40 x module overlap, plus, on the overlap, up to 30 "
                                                "for unequal update norms and up to 30 for opposed updates.")
    checks: list[Check] = Field(default_factory=list)
    overlap: float = Field(0.0, description="Shared adapted modules / all adapted modules.")
    norm_ratio: float | None = Field(None, description="Median over shared modules of the larger update norm "
                                                       "||B A|| x scaling over the smaller.")
    cosine: float | None = Field(None, description="Mean cosine similarity of the two updates over shared modules.")
    reasons: list[str] = Field(default_factory=list, description="What raised the risk, largest first.")
