"""``kind: "verify"`` and ``kind: "merge"`` jobs, run in the worker's training child like a train job.

``worker.train.run_training`` hands these kinds here; the outcome travels back to the daemon, which turns it
into ``result.json`` with ``AdapterJobOutcome.result``. This module imports no torch at load: the daemon
unpickles the outcome, and the daemon never imports torch. The heavy modules are imported inside the jobs.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.heartbeat import Progress
from schemas.job import ADAPTER_REF, JobSpec
from schemas.result import Result, Terminal
from schemas.verify import ChainReport, CheckStatus, VerifyReport
from spooler.errors import Cancelled, Rejected
from spooler.paths import outside_share
from worker import scratch
from worker.modelguard import check_adapter_dir, check_registered_adapter

if TYPE_CHECKING:
    from spooler.share import Share
    from worker.merge import Input
    from worker.train import TrainRequest

log = logging.getLogger(__name__)

MERGED_MODELS = "models/merged"  # default home of merged model folders, beside the models people put there


@dataclass
class AdapterJobOutcome:
    kind: str  # verify | merge
    ok: bool
    error: str | None = None
    verify: VerifyReport | None = None
    chain: ChainReport | None = None
    registered: str | None = None
    merged_model: str | None = None
    notes: list[str] = field(default_factory=list)

    def result(self, base: Result) -> Result:
        """The terminal record: succeeded only when every check passed (a verify job) or the merge was made and
        verified; otherwise failed, with the failing checks in ``error`` and every check in ``verify``."""
        return base.model_copy(update={
            "status": Terminal.succeeded if self.ok else Terminal.failed, "error": self.error,
            "verify": self.verify, "verify_chain": self.chain, "registered": self.registered,
            "merged_model": self.merged_model, "notes": list(self.notes)})


def failures(report: VerifyReport) -> str:
    return "; ".join(f"{c.name}: {c.reason}" for c in report.checks if c.status is CheckStatus.failed)


def run_adapter_job(req: TrainRequest, report: Callable[[Progress], None],
                    should_stop: Callable[[], bool]) -> AdapterJobOutcome:
    """Run one verify or merge job. Raises Rejected (bad input) or Cancelled, like a train job."""
    from spooler.share import Share, ShareError

    try:
        share = Share.open(req.share_root)
    except ShareError as e:
        raise Rejected("kind", f"{req.job.kind.value} jobs need the share's adapter registry: {e}") from None
    from worker.engine import quiet_libraries

    quiet_libraries()
    job = req.job
    report(Progress(job=job.id or "job", phase="verifying" if job.kind.value == "verify" else "merging"))
    _stop_if(should_stop)
    if job.kind.value == "verify":
        return verify_job(share, req)
    return merge_job(share, req, report, should_stop)


def _stop_if(should_stop: Callable[[], bool]) -> None:
    if should_stop():
        raise Cancelled()


# ── verify ───────────────────────────────────────────────────────────────────────────────────────────────
def verify_job(share: Share, req: TrainRequest) -> AdapterJobOutcome:
    from worker.adapter_verify import verify, verify_chain

    spec = req.job.verify
    assert spec is not None
    if spec.chain is not None:
        chain = verify_chain(share, spec.chain, req.device, req.datasets, spec.eval_tolerance, spec.rehash_base)
        bad = [f"{r.target}: {failures(r)}" for r in chain.versions if not r.ok]
        bad += [f"{c.name}: {c.reason}" for c in chain.links if c.status is CheckStatus.failed]
        return AdapterJobOutcome("verify", chain.ok, None if chain.ok else "verification failed: " + " | ".join(bad),
                                 chain=chain)
    target = target_for(share, req.job, req.model_dir, req.datasets)
    result = verify(target, req.device)
    return AdapterJobOutcome("verify", result.ok, None if result.ok else f"verification failed: {failures(result)}",
                             verify=result)


def target_for(share: Share, job: JobSpec, base: Path | None, datasets: list[Path]):  # noqa: ANN201 - Target
    """The verify job's adapter: a registered NAME/VERSION, or a folder on the share."""
    from spooler.paths import resolve_in_share
    from worker.adapter_verify import folder_target, registered_target

    spec = job.verify
    assert spec is not None and spec.adapter is not None
    options = {"base": base, "dataset": datasets, "tolerance": spec.eval_tolerance, "rehash": spec.rehash_base}
    if ADAPTER_REF.match(spec.adapter):
        target = registered_target(share, spec.adapter, "verify.adapter", **options)
        check_adapter_dir(target.folder, share.root, "verify.adapter")
        return target
    folder = resolve_in_share(share.root, spec.adapter, "verify.adapter")
    if not folder.is_dir():
        raise Rejected("verify.adapter", f"{spec.adapter!r} is not a folder; name a PEFT adapter folder")
    check_adapter_dir(folder, share.root, "verify.adapter")
    return folder_target(folder, spec.adapter, share, **options)


# ── merge ────────────────────────────────────────────────────────────────────────────────────────────────
def inputs_of(share: Share, refs: list[str]) -> list[Input]:
    from spooler import registry
    from worker.merge import Input

    found = []
    for text in refs:
        ref, folder = registry.loadable(share, text, "merge.adapters")
        check_adapter_dir(folder, share.root, "merge.adapters")
        manifest = registry.read_manifest(share, ref)
        assert manifest is not None  # loadable checked it parses
        check_registered_adapter(folder, manifest.files, str(ref), "merge.adapters")
        found.append(Input(str(ref), folder, manifest))
    return found


def merge_job(share: Share, req: TrainRequest, report: Callable[[Progress], None],
              should_stop: Callable[[], bool]) -> AdapterJobOutcome:
    from spooler import registry
    from spooler.paths import resolve_in_share
    from worker.merge import check_same_base
    from worker.modelguard import check_model_dir

    spec = req.job.merge
    assert spec is not None
    inputs = inputs_of(share, spec.adapters)
    base_rel = inputs[0].manifest.base.path  # type: ignore[union-attr] - resolve() checked the manifest is there
    if req.job.base_model is not None and req.job.base_model != base_rel:
        raise Rejected("base_model", f"a merge uses its adapters' own base ({base_rel}); leave base_model out")
    base_dir = resolve_in_share(share.root, base_rel, "merge.adapters")
    check_model_dir(base_dir, share.root)
    base = check_same_base(inputs, base_dir, registry.base_cache_file(share, base_rel))
    _stop_if(should_stop)
    if spec.into == "base":
        return _into_base(share, req, inputs[0], base_dir, base, should_stop)
    return _combined(share, req, inputs, base_dir, base, should_stop)


def _into_base(share: Share, req: TrainRequest, item: Input, base_dir: Path, base,  # noqa: ANN001
               should_stop: Callable[[], bool]) -> AdapterJobOutcome:
    from schemas.adapter import MANIFEST, MergedModel
    from spooler.share import read_model
    from worker.merge import into_base

    spec = req.job.merge
    assert spec is not None
    rel = spec.output or f"{MERGED_MODELS}/{item.label.replace('/', '-')}"
    out_dir = share.root / rel
    _check_inside(share, out_dir, "merge.output")  # before anything is read or made through it
    done = read_model(out_dir / MANIFEST, MergedModel)
    if done is not None and req.job.id is not None and done.job_id == req.job.id:  # requeued after it merged?
        if problems := _not_our_merge(done, item, base, out_dir):
            raise Rejected("merge.output", f"{rel} already exists and is not this job's earlier merge "
                                           f"({problems[0]}); a merge never replaces a folder: name another output")
        return AdapterJobOutcome("merge", True, merged_model=rel, notes=done.notes)
    # Checked again just before the model is published: a merge for a job that was cancelled, or whose worker
    # was killed (another worker takes it over), must not appear under models/.
    record = into_base(item, base_dir, base, out_dir, req.device, share.file_mode, req.job.id,
                       before_publish=lambda: _stop_if(should_stop))
    return AdapterJobOutcome("merge", True, merged_model=rel, notes=record.notes)


def _not_our_merge(done, item: Input, base, out_dir: Path) -> list[str]:  # noqa: ANN001 - MergedModel, BaseIdentity
    """Why a folder whose manifest names this job is not what its earlier attempt published: anyone can write
    a manifest.json (an adversarial review planted one, and the job 'succeeded' on the planted weights). The
    merge it records must be of this adapter into this base, and the folder must hold exactly its files. (A
    writer who forges all of that consistently is not caught: the share has no secret to sign with.)"""
    from schemas.adapter import MANIFEST
    from worker.verify import compare_files

    if done.adapter != item.label or done.base.sha256 != base.sha256:
        return [f"its manifest records {done.adapter} into a base of sha256 {done.base.sha256[:12]}"]
    return compare_files(out_dir, done.files, skip=(MANIFEST,))


def _check_inside(share: Share, out_dir: Path, field_name: str) -> None:
    """The output must really be under the share's models/ (no symlinked folder leading out of it, to another
    disk or into the spool's own folders): checked before its parent is made, so that no folder is made out
    there, and again after, against a link made in between."""
    for made in (False, True):
        if made:
            share.makedirs(out_dir.parent)
        if real := outside_share(share.root / "models", out_dir):
            raise Rejected(field_name, f"{share.rel(out_dir)} resolves to {real}, outside the share's models/")


def _combined(share: Share, req: TrainRequest, inputs: list[Input], base_dir: Path,
              base, should_stop: Callable[[], bool]) -> AdapterJobOutcome:  # noqa: ANN001 - BaseIdentity
    from spooler import registry
    from worker.adapter_verify import folder_target, registered_target, verify
    from worker.merge import combine, merge_info
    from worker.verify import file_entries

    spec = req.job.merge
    assert spec is not None
    name = registry.name_for(req.job)
    if req.job.id and (done := registry.registered_by(share, name, req.job.id)) is not None:
        if problem := registry.not_made_by_job(share, done, "merge", base.sha256, [i.label for i in inputs]):
            raise Rejected("merge", f"{done} names this job but is not its earlier merge ({problem}); someone made "
                                    "it by hand: submit the merge again under a new id")
        return AdapterJobOutcome("merge", True, registered=str(done), notes=["registered by an earlier attempt"])
    weights = spec.weights or [1.0] * len(inputs)
    # Staged on this machine's own disk, not in the share's tmp/: anyone can write there, and weights swapped
    # between their verification and their registration would be registered as this merge (last note).
    with tempfile.TemporaryDirectory(prefix=scratch.prefix("merge"), ignore_cleanup_errors=True) as folder:
        staged = Path(folder) / "adapter"
        combine(inputs, base_dir, base.path, weights, spec.combination, spec.density, staged, req.device)
        made = {n: e.sha256 for n, e in file_entries(staged, skip=(registry.MANIFEST,)).items()}  # what is verified
        # Verified before it is registered: a bad merge must never become the newest version of a name.
        staged_report = verify(folder_target(staged, f"merge of {name}", share, base=base_dir), req.device)
        if not staged_report.ok:
            return AdapterJobOutcome("merge", False, f"the merged adapter fails verification, so it was not "
                                     f"registered: {failures(staged_report)}", verify=staged_report)
        info = merge_info(spec.combination, weights, spec.density)
        _stop_if(should_stop)  # never register a version for a job that is ending or taken over
        ref = registry.register_merged(share, name, staged, base, [i.label for i in inputs], info, req.job.id,
                                       [f"{spec.combination} of {', '.join(i.label for i in inputs)} with weights "
                                        f"{weights}"], expected=made)
    report = verify(registered_target(share, str(ref)), req.device)  # as registered: hashes and manifest too
    error = None if report.ok else f"the merged adapter {ref} fails verification: {failures(report)}"
    return AdapterJobOutcome("merge", report.ok, error, verify=report, registered=str(ref))
