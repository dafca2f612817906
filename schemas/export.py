"""Write every share record as JSON Schema, so people can check a job file in their editor.

Point an editor at ``schemas/json/job.schema.json`` by file pattern (VS Code: ``json.schemas``).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.adapter import AdapterList, BaseHashCache, GcReport, Manifest, MergedModel
from schemas.checkpoint import CheckpointState, MetricsLine
from schemas.heartbeat import Heartbeat
from schemas.job import JobSpec
from schemas.result import Result
from schemas.settings import ShareSettings
from schemas.verify import ChainReport, CompatReport, VerifyReport

RECORDS: dict[str, type[BaseModel]] = {
    "job": JobSpec, "result": Result, "heartbeat": Heartbeat, "share-settings": ShareSettings,
    "checkpoint-state": CheckpointState, "metrics-line": MetricsLine,
    "adapter-manifest": Manifest, "merged-model-manifest": MergedModel, "verify-report": VerifyReport,
    "chain-report": ChainReport, "compat-report": CompatReport, "adapter-list": AdapterList, "gc-report": GcReport,
    "base-hash-cache": BaseHashCache,
}
DEFAULT_DIR = Path(__file__).parent / "json"


def schema_text(model: type[BaseModel]) -> str:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def export(folder: Path | None = None) -> list[Path]:
    folder = folder or DEFAULT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in RECORDS.items():
        path = folder / f"{name}.schema.json"
        path.write_text(schema_text(model))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in export():
        print(p)
