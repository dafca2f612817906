"""``loraspool status``: workers, queued and running jobs, recent results.

A one-shot status cannot watch heartbeats for ``stale_after``; it judges from file times on the share and,
only where that rests on two clocks agreeing, watches seq for about one interval. Each worker's entry says how
sure the verdict is (``confidence``) and why (``reason``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from schemas.heartbeat import Progress
from schemas.result import Result
from spooler import claim
from spooler.clock import Clock
from spooler.heartbeat import snapshot, watch_briefly
from spooler.jobfile import looks_temporary, peek_id
from spooler.share import Share, read_model

RECENT = 20


def gather(share: Share, clock: Clock, wait: bool = True) -> dict[str, Any]:
    """The stable ``status --json`` document: {"workers": [...], "jobs": [...]}."""
    views = snapshot(share, clock)
    if wait:
        views = watch_briefly(share, clock, views, limit=share.settings.stale_after / 2)
    workers = []
    for wid, v in sorted(views.items()):
        hb = v.heartbeat
        workers.append({
            "id": wid, "device": hb.device if hb else None, "stale": v.stale, "confidence": v.confidence,
            "reason": v.reason, "age_seconds": None if v.age is None else round(v.age, 1),
            "state": hb.state.value if hb else None, "host": hb.host if hb else None,
            "job": hb.job if hb else None, "seq": hb.seq if hb else None, "fallback": hb.fallback if hb else False,
            "gpus": [g.model_dump() for g in hb.gpus] if hb else [],
            "progress": hb.progress.model_dump() if hb and hb.progress else None,
            "version": hb.version if hb else None,
        })
    return {"workers": workers, "jobs": _incoming(share) + _queued(share) + _running(share) + _recent(share)}


def _incoming(share: Share) -> list[dict]:
    out = []
    for path in sorted(share.inbox.glob("*")):
        if not looks_temporary(path.name):
            out.append({"id": peek_id(path, share.settings.max_job_bytes), "state": "incoming", "worker": None,
                        "file": path.name})
    return out


def _queued(share: Share) -> list[dict]:
    return [{"id": k.job_id, "state": "queued", "worker": None, "priority": k.priority, "attempt": k.attempt}
            for k, _ in claim.queued(share)]


def _running(share: Share) -> list[dict]:
    out = []
    for worker, key, _path in claim.running(share):
        progress = read_model(share.result_dir(key.job_id) / "progress.json", Progress)
        out.append({"id": key.job_id, "state": "running", "worker": worker, "attempt": key.attempt,
                    "priority": key.priority, "progress": progress.model_dump() if progress else None})
    return out


def _recent(share: Share) -> list[dict]:
    found = []
    try:
        entries = list(os.scandir(share.results))
    except FileNotFoundError:
        return []
    for entry in entries:
        path = Path(entry.path) / "result.json"
        try:
            found.append((path.stat().st_mtime, path))
        except OSError:
            continue
    out = []
    for _, path in sorted(found, reverse=True)[:RECENT]:
        r = read_model(path, Result)
        if r is not None:
            out.append({"id": r.id, "state": r.status.value, "worker": r.worker, "attempt": r.attempts,
                        "error": r.error, "device": r.device, "fallback": r.fallback, "finished_at": r.finished_at,
                        "eval_loss_after": r.metrics.eval_loss_after})
    return out


def render(doc: dict[str, Any]) -> str:
    lines = ["WORKERS"]
    if not doc["workers"]:
        lines.append("  (no heartbeats on this share)")
    gone = [w for w in doc["workers"] if w.get("fallback") and w["state"] == "stopped"]
    if gone:  # a submitter's fallback has its own id each time: once stopped, it is history, in --json
        lines.append(f"  ({len(gone)} stopped fallback worker{'s' if len(gone) != 1 else ''} not shown; see --json)")
    for w in (w for w in doc["workers"] if w not in gone):
        mark = "stopped" if w["state"] == "stopped" else "stale" if w["stale"] else "live"
        job = f" job {w['job']}" if w["job"] else ""
        if mark == "stale" and job:  # its last word, not what it does now: the job may have moved on
            job = f" (last said:{job})"
        lines.append(f"  {w['id']:<24} {mark:<7} {w['device'] or '?':<4} {w['state'] or '?':<8}{job}"
                     f"  ({w['reason']}; confidence: {w['confidence']})")
    lines.append("JOBS")
    if not doc["jobs"]:
        lines.append("  (none)")
    stale = {w["id"] for w in doc["workers"] if w["stale"]}
    for j in doc["jobs"]:
        extra = ""
        if j["state"] == "running" and j.get("worker") in stale:  # its progress and ETA are its last word
            extra = " - its worker is stale: the job goes back to the queue (or fails, with no attempts left)"
        elif (p := j.get("progress")) and p.get("total_steps"):
            loss = f" loss {p['loss']:.3f}" if p.get("loss") is not None else ""
            speed = f" {p['tokens_per_second']:,.0f} tok/s" if p.get("tokens_per_second") else ""
            eta = f" ETA {_duration(p['eta_seconds'])}" if p.get("eta_seconds") is not None else ""
            extra = f" step {p['step']}/{p['total_steps']}{loss}{speed}{eta}"
        if j.get("error"):
            extra += f" - {j['error']}"
        who = f" on {j['worker']}" if j.get("worker") else ""
        lines.append(f"  {j['id']:<32} {j['state']:<10}{who}{extra}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    """3h05m, 4m10s, 12s: an ETA people read at a glance."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
