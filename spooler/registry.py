"""The adapter registry on the share: ``SHARE/adapters/<name>/v<N>/``, write-once, one folder per version.

A version appears by one rename of a fully written temp folder (``adapters/<name>/.v-<token>.tmp/``) onto
``v<N>``. A version folder is never empty (it holds its manifest), and a rename onto a non-empty folder fails on
POSIX, SMB and NFS alike, so of two registrations racing for v3 exactly one gets it; the other retries as v4.
The manifest is read back after the rename (its ``token`` must be ours), because some SMB clients report a
rename as done to both sides of a race. Nothing here changes or deletes a registered version, except
``gc`` with ``--apply``, and then only versions a person named. No torch: the CLI lists and collects on a laptop.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from schemas.adapter import (
    MANIFEST,
    AdapterList,
    BaseIdentity,
    BaseNode,
    DatasetInfo,
    FileEntry,
    GcReport,
    LoraShape,
    Manifest,
    MergedModel,
    MergedNode,
    MergeInfo,
    SizeLevel,
    VersionNode,
)
from schemas.job import ADAPTER_REF, JobSpec, id_problem, ref_problem
from schemas.result import DataReport, Metrics, Result
from spooler import claim
from spooler.atomic import chmod_tree, fsync_dir, fsync_tree
from spooler.clock import iso
from spooler.errors import Rejected
from spooler.jobfile import looks_temporary, parse_spec, read_limited
from spooler.paths import canonical, link_below, outside_share, resolve_in_share
from spooler.share import TOKEN_CACHE, Share, read_model
from spooler.states import JobState, source_name
from worker.verify import base_identity, file_entries

log = logging.getLogger(__name__)

ADAPTERS = "adapters"
HASH_CACHE = ".base-hashes"  # per-share: hashed once by whichever machine first needs it, reused by all
VERSION = re.compile(r"^v([1-9][0-9]*)\Z")
GB = 10**9
GC_HIDDEN = re.compile(r"^\.gc-(?P<name>.+)-[0-9a-f]{8}(?P<deleting>\.deleting)?\.tmp$")
MERGED_DEPTH = 2  # models/merged/NAME/manifest.json: the folders below models/ that adapters looks into
MAX_TRIES = 1000
ARRIVING = (JobState.incoming.value, JobState.accepting.value)  # job files that may still be copies in pieces


class RegistryError(Exception):
    """A registration or removal could not be done; the message says what to do."""


@dataclass(frozen=True, order=True)
class Ref:
    name: str
    number: int

    @classmethod
    def parse(cls, text: str, field: str = "adapter") -> Ref:
        if problem := ref_problem(text):
            raise Rejected(field, problem)
        m = ADAPTER_REF.match(text)
        assert m is not None
        return cls(m["name"], int(m["version"][1:]))

    @property
    def version(self) -> str:
        return f"v{self.number}"

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"


# ── reading ──────────────────────────────────────────────────────────────────────────────────────────────
def root(share: Share) -> Path:
    return share.root / ADAPTERS


def version_dir(share: Share, ref: Ref) -> Path:
    return root(share) / ref.name / ref.version


def names(share: Share) -> list[str]:
    base = root(share)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and id_problem(p.name) is None)


def numbers(share: Share, name: str) -> list[int]:
    """The registered version numbers of ``name``, oldest first (temp and removal folders are dot names)."""
    folder = root(share) / name
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if p.is_dir() and (m := VERSION.match(p.name)))


def refs(share: Share) -> list[Ref]:
    return [Ref(n, v) for n in names(share) for v in numbers(share, n)]


def read_manifest(share: Share, ref: Ref) -> Manifest | None:
    return read_model(version_dir(share, ref) / MANIFEST, Manifest)


def manifests(share: Share) -> tuple[dict[Ref, Manifest], list[str]]:
    """Every readable manifest, and a warning for each version folder without one."""
    found: dict[Ref, Manifest] = {}
    warnings = []
    for ref in refs(share):
        manifest = read_manifest(share, ref)
        if manifest is None:
            warnings.append(f"{ADAPTERS}/{ref} has no readable {MANIFEST}; run: loraspool verify {ref}")
        else:
            found[ref] = manifest
    return found, warnings


def resolve(share: Share, text: str, field: str) -> tuple[Ref, Path]:
    """A registered version's ref and folder, or Rejected(field) saying what is registered."""
    ref = Ref.parse(text, field)
    folder = version_dir(share, ref)
    if (folder / MANIFEST).is_file():  # a symlinked registry folder may not lead out of the share
        folder = resolve_in_share(share.root, f"{ADAPTERS}/{ref}", field)
    if not (folder / MANIFEST).is_file():
        have = numbers(share, ref.name)
        known = (f"{ref.name} has {', '.join(f'v{n}' for n in have)}" if have
                 else f"no adapter named {ref.name!r} is registered")
        raise Rejected(field, f"{text!r} is not registered ({known}); see: loraspool adapters")
    return ref, folder


def loadable(share: Share, text: str, field: str) -> tuple[Ref, Path]:
    """``resolve``, for a version about to be loaded (a parent, a merge input): peft falls back to
    adapter_model.bin, a pickle that can run code, when adapter_model.safetensors is not there. A verify job
    uses ``resolve`` instead, so that it reports such a folder rather than refusing to look."""
    ref, folder = resolve(share, text, field)
    if not (folder / "adapter_model.safetensors").is_file():
        raise Rejected(field, f"{ref} has no adapter_model.safetensors, and a pickle is never loaded; see what is "
                              f"wrong with: loraspool verify {ref}")
    if read_manifest(share, ref) is None:  # its base, its lineage and its files' hashes all come from it
        raise Rejected(field, f"{ref}'s manifest.json does not parse as a version's manifest; see what is wrong "
                              f"with: loraspool verify {ref}")
    return ref, folder


def base_cache_file(share: Share, rel_path: str) -> Path:
    key = hashlib.sha256(rel_path.replace("\\", "/").strip("/").encode()).hexdigest()[:24]
    return root(share) / HASH_CACHE / f"{key}.json"


def base_identity_of(share: Share, rel_path: str, rehash: bool = False) -> BaseIdentity:
    """The identity of a base model folder on the share, hashed through the share's cache."""
    folder = resolve_in_share(share.root, rel_path, "base_model")
    return base_identity(folder, rel_path, base_cache_file(share, rel_path), rehash, share.file_mode)


# ── registering ──────────────────────────────────────────────────────────────────────────────────────────
def stage(share: Share, name: str) -> Path:
    """A fresh temp folder beside the versions of ``name``, on the same file system, for ``publish``."""
    if problem := id_problem(name):
        raise Rejected("register_as", problem)
    if real := outside_share(share.root, root(share) / name):  # adapters/<name> a symlink leading out
        raise Rejected("register_as", f"adapters/{name} resolves to {real}, outside the share")
    share.makedirs(root(share) / name)
    folder = root(share) / name / f".v-{uuid.uuid4().hex[:12]}.tmp"
    folder.mkdir()
    os.chmod(folder, share.dir_mode)
    return folder


def publish(share: Share, staged: Path, manifest: Manifest) -> Ref:
    """Rename the fully written ``staged`` folder to the next free ``v<N>``: exactly once, never over another."""
    name_dir = staged.parent
    number = max(numbers(share, manifest.name), default=0) + 1
    for _ in range(MAX_TRIES):
        manifest.version = f"v{number}"
        share.write_json(staged / MANIFEST, manifest)
        fsync_tree(staged)
        target = name_dir / manifest.version
        try:
            os.rename(staged, target)
        except OSError as e:
            # EEXIST/ENOTEMPTY: another registration won v<number>. ENOTDIR: a file or a dangling link someone
            # left under that name, which is no version but would block every registration of the name for good.
            if not (isinstance(e, FileExistsError) or e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR)):
                raise
            number = max([number, *numbers(share, manifest.name)]) + 1
            continue
        _confirm(target, manifest)
        fsync_dir(name_dir)
        ref = Ref(manifest.name, number)
        log.info("adapter %s registered (job %s, %d bytes)", ref, manifest.job_id, manifest.size_bytes)
        return ref
    raise RegistryError(f"no free version of {manifest.name} after {MAX_TRIES} tries; is adapters/ writable?")


def _confirm(target: Path, manifest: Manifest) -> None:
    written = read_model(target / MANIFEST, Manifest)
    if written is None or written.token != manifest.token:
        raise RegistryError(f"{target} does not hold this registration after the rename (the share's client "
                            "reported a rename that another registration won); run the job again")


def copy_adapter(share: Share, source: Path, staged: Path,
                 expected: dict[str, str] | None = None) -> dict[str, FileEntry]:
    """Copy an adapter's files into ``staged``, prove the copy whole against ``expected`` (name -> sha256), and
    return the copy's entries: hashed once, where the manifest needs them too (each read crosses the network)."""
    for path in sorted(source.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.name == MANIFEST:
            continue
        dest = staged / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    chmod_tree(staged, share.file_mode)
    entries = file_entries(staged, skip=(MANIFEST,))
    if expected is not None and {n: e.sha256 for n, e in entries.items()} != expected:
        raise RegistryError(f"the copy of {source} into the registry does not match its hashes; the source "
                            "changed or the share lost bytes: check it with loraspool verify")
    return entries


def register(share: Share, name: str, source: Path, manifest: Manifest,
             expected: dict[str, str] | None = None) -> Ref:
    """Register the adapter in ``source`` as the next version of ``name``; ``manifest`` is completed here."""
    staged = stage(share, name)
    try:
        entries = copy_adapter(share, source, staged, expected)
        manifest.name, manifest.files = name, entries
        manifest.size_bytes = sum(e.size for e in entries.values())
        return publish(share, staged, manifest)
    finally:
        if staged.exists():  # our own temp folder, never published: nobody else knows it
            shutil.rmtree(staged, ignore_errors=True)


def lora_shape(adapter_dir: Path, quantization: str) -> LoraShape:
    """The LoRA shape peft saved in adapter_config.json."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    targets = config.get("target_modules") or []
    return LoraShape(target_modules=sorted(targets) if isinstance(targets, list) else targets,
                     r=int(config.get("r", 0)), alpha=float(config.get("lora_alpha", 0)),
                     use_dora=bool(config.get("use_dora", False)), modules_to_save=config.get("modules_to_save"),
                     quantization=quantization)


def name_for(spec: JobSpec) -> str:
    """register_as, else the parent's (or the first merged input's) name, else the job id."""
    if spec.register_as:
        return spec.register_as
    first = spec.parent or (spec.merge.adapters[0] if spec.merge else None)
    return Ref.parse(first).name if first else str(spec.id)


def registered_by(share: Share, name: str, job_id: str) -> Ref | None:
    """The version a job already registered: a job that runs again (requeued after a crash) registers once."""
    for number in numbers(share, name):
        manifest = read_manifest(share, Ref(name, number))
        if manifest is not None and manifest.job_id == job_id:
            return Ref(name, number)
    return None


def not_made_by_job(share: Share, ref: Ref, origin: str, base_sha256: str,
                    parents: list[str] | None = None, files: dict[str, str] | None = None) -> str | None:
    """Why a version whose manifest names a job is not what that job's earlier attempt registered, or None.
    Anyone can write a manifest.json: it must record this origin ("train" or "merge"), this base, these parents
    (when given), these files' hashes (``files``, when given), and the folder must hold exactly its files. (A
    forgery consistent in all of that goes unnoticed: the share has no secret to sign with.)"""
    from worker.verify import compare_files

    manifest = read_manifest(share, ref)
    if manifest is None or manifest.origin != origin or (parents is not None and manifest.parents != parents):
        return f"its manifest records no {origin} of these inputs"
    if manifest.base.sha256 != base_sha256:
        return f"its manifest records a base of sha256 {manifest.base.sha256[:12]}"
    if files is not None and {name: entry.sha256 for name, entry in manifest.files.items()} != files:
        # A planted copy of another adapter that names this job (or an earlier attempt's other weights): the
        # result must name what this attempt trained.
        return "its files are not this adapter's"
    problems = compare_files(version_dir(share, ref), manifest.files, skip=(MANIFEST,))
    return problems[0] if problems else None


def register_trained(share: Share, spec: JobSpec, adapter_dir: Path, metrics: Metrics, data: DataReport | None,
                     quantization: str = "none", notes: list[str] | None = None,
                     expected: dict[str, str] | None = None) -> Ref:
    """Register a train job's adapter; idempotent per job id."""
    name = name_for(spec)
    assert spec.base_model is not None
    if (done := registered_by(share, name, str(spec.id))) is not None:
        forged = not_made_by_job(share, done, "train", base_identity_of(share, spec.base_model).sha256,
                                 files=expected)
        if forged is None:
            return done
        # Hours of training are not thrown away over someone else's folder: it gets a version of its own.
        log.warning("adapter %s names job %s but is not its earlier registration (%s); registering anew", done,
                    spec.id, forged)
    if spec.parent and read_manifest(share, Ref.parse(spec.parent)) is None:
        # Registered anyway, it could take the parent's own number and name itself as its parent (a share from
        # before the registry, or a parent removed by hand): refuse, and say in which order to register.
        raise RegistryError(f"its parent {spec.parent} is not registered on this share; register the job that "
                            f"trained {spec.parent} first (loraspool register JOB_ID), then this one")
    dataset = None if data is None else DatasetInfo(files=data.files, sha256=data.sha256,
                                                     train_rows=data.train_rows, eval_rows=data.eval_rows)
    manifest = Manifest(name=name, version="v0", origin="train", job_id=spec.id, created_at=iso(time.time()),
                        token=uuid.uuid4().hex, files={}, size_bytes=0,
                        base=base_identity_of(share, spec.base_model), lora=lora_shape(adapter_dir, quantization),
                        dataset=dataset, training=spec.training, metrics=metrics,
                        parents=[spec.parent] if spec.parent else [], notes=list(notes or []))
    return register(share, name, adapter_dir, manifest, expected)


def register_merged(share: Share, name: str, adapter_dir: Path, base: BaseIdentity, parents: list[str],
                    merge: MergeInfo, job_id: str | None, notes: list[str],
                    expected: dict[str, str] | None = None) -> Ref:
    """Register an adapter made by combining registered ones; idempotent per job id. ``expected``: the hashes
    of the files as verified, which the copy into the registry must match."""
    if job_id is not None and (done := registered_by(share, name, job_id)) is not None:
        return done
    manifest = Manifest(name=name, version="v0", origin="merge", job_id=job_id, created_at=iso(time.time()),
                        token=uuid.uuid4().hex, files={}, size_bytes=0, base=base,
                        lora=lora_shape(adapter_dir, "none"), parents=parents, merge=merge, notes=notes)
    return register(share, name, adapter_dir, manifest, expected)


def register_from_result(share: Share, result: Result, spec: JobSpec) -> Ref:
    """Register a succeeded train job's adapter from ``results/<id>/adapter`` (for results that predate the
    registry, or a daemon that registers after concluding). Idempotent per job id."""
    if result.adapter is None:
        raise RegistryError(f"job {result.id} has no adapter to register (status {result.status.value})")
    folder = resolve_in_share(share.root, result.adapter.path, "adapter")
    quantization = "none" if any("plain LoRA" in n for n in result.notes) else spec.quantization.value
    return register_trained(share, spec, folder, result.metrics, result.data, quantization, result.notes,
                            result.adapter.files)


# ── the tree, sizes and warnings ─────────────────────────────────────────────────────────────────────────
def level_of(chain_bytes: int, share: Share) -> SizeLevel:
    s = share.settings
    gb = chain_bytes / GB
    if gb >= s.size_critical_gb:
        return SizeLevel.critical
    if gb >= s.size_merge_gb:
        return SizeLevel.merge
    if gb >= s.size_plan_gb:
        return SizeLevel.plan
    return SizeLevel.optimal


def ancestors(ref: str, by_ref: dict[str, Manifest]) -> list[str]:
    """Every registered version ``ref`` descends from (parents of parents...), each once."""
    seen: list[str] = []
    pending = list(by_ref[ref].parents) if ref in by_ref else []
    while pending:
        parent = pending.pop()
        if parent in seen or parent == ref:
            continue
        seen.append(parent)
        if parent in by_ref:
            pending.extend(by_ref[parent].parents)
    return seen


def chain_bytes(ref: str, by_ref: dict[str, Manifest]) -> int:
    m = by_ref[ref]
    return m.base.size_bytes + m.size_bytes + sum(by_ref[a].size_bytes for a in ancestors(ref, by_ref)
                                                  if a in by_ref)


def _node(ref: str, by_ref: dict[str, Manifest], share: Share) -> VersionNode:
    m = by_ref[ref]
    total = chain_bytes(ref, by_ref)
    node = VersionNode(ref=ref, origin=m.origin, job_id=m.job_id, created_at=m.created_at, size_bytes=m.size_bytes,
                       chain_bytes=total, level=level_of(total, share),
                       eval_loss=m.metrics.eval_loss_after if m.metrics else None, parents=m.parents)
    node.warnings = _warnings(node, m, by_ref)
    return node


def _warnings(node: VersionNode, m: Manifest, by_ref: dict[str, Manifest]) -> list[str]:
    out = []
    if node.level is not SizeLevel.optimal:
        out.append(f"chain is {node.chain_bytes / GB:.1f} GB: {node.level.value}"
                   + ("; fold it into the base: loraspool merge " + node.ref + " --into base"
                      if node.level in (SizeLevel.merge, SizeLevel.critical) else ""))
    for parent in m.parents:
        p = by_ref.get(parent)
        if p is None:
            out.append(f"parent {parent} is not registered (removed, or registered on another share)")
        elif p.base.sha256 != m.base.sha256:
            out.append(f"parent {parent} was trained on another base ({p.base.path}, sha256 {p.base.sha256[:12]})")
        elif (node.eval_loss is not None and p.metrics and p.metrics.eval_loss_after is not None
              and m.origin == "train" and node.eval_loss > p.metrics.eval_loss_after):
            out.append(f"eval loss {node.eval_loss:.4g} is worse than its parent's ({p.metrics.eval_loss_after:.4g})")
    return out


def listing(share: Share) -> AdapterList:
    """The registry as a tree: each base model (folder and hash) at a root, versions under their parents."""
    found, warnings = manifests(share)
    by_ref = {str(r): m for r, m in sorted(found.items())}
    nodes = {ref: _node(ref, by_ref, share) for ref in by_ref}
    bases: dict[tuple[str, str], BaseNode] = {}
    for ref, m in by_ref.items():
        key = (m.base.path, m.base.sha256)
        base = bases.setdefault(key, BaseNode(path=m.base.path, sha256=m.base.sha256, size_bytes=m.base.size_bytes))
        parent = next((p for p in m.parents if p in by_ref and by_ref[p].base.sha256 == m.base.sha256), None)
        (nodes[parent].children if parent else base.versions).append(nodes[ref])
    paths = [path for path, _ in bases]
    for path in sorted({p for p in paths if paths.count(p) > 1}):
        warnings.append(f"{path} changed between registrations ({paths.count(path)} different hashes): adapters "
                        "trained on an older copy need that copy; see loraspool verify")
    return AdapterList(bases=sorted(bases.values(), key=lambda b: b.path), merged=merged_models(share),
                       warnings=warnings)


def merged_models(share: Share) -> list[MergedNode]:
    """Every folder under ``models/`` (to ``MERGED_DEPTH``) whose manifest is a merged model's. A merge job may
    write anywhere on the share (``merge.output``); under models/ is the default and where people keep them."""
    found = []
    for path in _manifests_under(share.root / "models", MERGED_DEPTH):
        m = read_model(path, MergedModel)
        if m is not None:
            found.append(MergedNode(path=path.parent.relative_to(share.root).as_posix(), adapter=m.adapter,
                                    base=m.base.path, size_bytes=m.size_bytes, dtype=m.dtype,
                                    created_at=m.created_at, job_id=m.job_id))
    return sorted(found, key=lambda n: n.path)


def _manifests_under(folder: Path, depth: int) -> Iterator[Path]:
    """``manifest.json`` files at most ``depth`` folders down. Links are not followed (a link on the share may lead
    anywhere, or in a loop), nor are hidden folders (a merge still being written is ``.NAME.<random>.tmp``)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name == MANIFEST and entry.is_file(follow_symlinks=False):
            yield Path(entry.path)
        elif depth > 0 and not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
            yield from _manifests_under(Path(entry.path), depth - 1)


def render(tree: AdapterList) -> str:
    lines = []
    for base in tree.bases:
        lines.append(f"{base.path}  (base, sha256 {base.sha256[:12]}, {human(base.size_bytes)})")
        lines += _render_nodes(base.versions, "")
    if tree.merged:
        lines.append("merged models:")
        lines += [f"  {m.path}  {human(m.size_bytes)} {m.dtype}  {m.adapter} merged into {m.base}  {m.created_at}"
                  for m in tree.merged]
    lines += [f"warning: {w}" for w in tree.warnings]
    return "\n".join(lines) if lines else "no adapters registered yet"


def _render_nodes(nodes: list[VersionNode], prefix: str) -> list[str]:
    lines = []
    for i, node in enumerate(nodes):
        last = i == len(nodes) - 1
        loss = f"eval {node.eval_loss:.4g}" if node.eval_loss is not None else "eval -"
        extra = f"  from {', '.join(node.parents)}" if node.origin == "merge" else ""
        lines.append(f"{prefix}{'└── ' if last else '├── '}{node.ref}  {human(node.size_bytes)}  {loss}  "
                     f"chain {human(node.chain_bytes)} ({node.level.value}){extra}")
        inner = prefix + ("    " if last else "│   ")
        lines += [f"{inner}  ! {w}" for w in node.warnings]
        lines += _render_nodes(node.children, inner)
    return lines


def human(n: int) -> str:
    for unit, size in (("GB", GB), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ── retention ────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Doomed:
    """A thing gc may remove: a registered version (key NAME/vN), a merged model folder (key: its path), or the
    token cache (key datasets/.tokens)."""

    key: str
    folder: Path
    size: int
    kind: str  # "adapter", "merged model" or "token cache", for the log


def _kept(all_refs: list[Ref], by_ref: dict[str, Manifest], keep: set[str], named: dict[str, str],
          merged: list[str]) -> dict[str, str]:
    """Why each version or merged model must stay: the newest of its name, named by a job that has not finished
    (``named``, keyed lower-cased), asked to stay, or an ancestor of a version that stays."""
    why: dict[str, str] = {}
    newest: dict[str, int] = {}
    for r in all_refs:
        newest[r.name] = max(newest.get(r.name, 0), r.number)
    for r in all_refs:
        if r.number == newest[r.name]:
            why[str(r)] = f"the newest version of {r.name}"
    for key in [str(r) for r in all_refs] + merged:
        if (jobs := named.get(key.lower())) is not None:
            why.setdefault(key, jobs)
    for key in sorted(keep - set(why)):
        why[key] = "not named for removal"
    for r in all_refs:
        if str(r) not in by_ref:  # its parents are unknown, so nothing says it is safe to lose
            why.setdefault(str(r), f"no readable {MANIFEST}; check it with loraspool verify {r}")
    for ref in list(why):
        for parent in ancestors(ref, by_ref):
            why.setdefault(parent, f"an ancestor of {ref}, which stays")
    return why


def _unfinished_jobs(share: Share) -> Iterator[tuple[str, str, Path]]:
    """(state, name to parse it as, path) of every job file not yet concluded: inbox, intake, queue, running.
    Listed in the order jobs move, so a job that moves on while we look is still seen in its next folder.
    The name to parse as gives a job without an ``id`` the id it has (or will get), as intake gives it."""
    for path in _entries(share.inbox):
        if not looks_temporary(path.name):
            yield JobState.incoming.value, path.name, path
    for worker in _entries(share.root / "intake"):
        for path in _entries(worker):
            yield JobState.accepting.value, source_name(path), path
    for key, path in claim.queued(share):
        yield JobState.queued.value, f"{key.job_id}.json", path
    for worker_id, key, path in claim.running(share):
        yield f"{JobState.running.value} on {worker_id}", f"{key.job_id}.json", path


def _entries(folder: Path) -> list[Path]:
    """A folder's entries, sorted; none when it does not exist. Any other error stops gc: a folder of jobs that
    cannot be listed may name any version, so nothing may be removed on its account."""
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_job(share: Share, path: Path, as_name: str) -> JobSpec | None:
    """The job in ``path``, or None when it cannot be read (gone, half-copied, garbage, invalid): such a file
    must not stop gc, and the versions it would name cannot be known anyway."""
    limit = share.settings.max_job_bytes
    try:
        return parse_spec(read_limited(path, limit), as_name, limit)
    except (OSError, Rejected):
        return None


def _job_names(spec: JobSpec, keys: list[str]) -> list[str]:
    """What a job will load that gc could remove: a train job's parent; a verify job's adapter, as NAME/VERSION
    or as a registered version's folder (or a folder in it), and every version of a verify job's chain; a merge
    job's inputs; and the base model folder (a merged model may be one). ``keys``: every NAME/VERSION there is."""
    named = [spec.parent, *(spec.merge.adapters if spec.merge else [])]
    verify = spec.verify
    if verify is not None and verify.adapter is not None:
        folder = canonical(verify.adapter).lower()
        named += [verify.adapter, *(k for k in keys if folder == f"{ADAPTERS}/{k}".lower()
                                    or folder.startswith(f"{ADAPTERS}/{k}/".lower()))]
    if verify is not None and verify.chain is not None:
        named += [k for k in keys if k.split("/", 1)[0].lower() == verify.chain.lower()]
    refs = [r for r in named if r is not None and ref_problem(r) is None]
    return refs + ([canonical(spec.base_model)] if spec.base_model else [])


def _named_by_jobs(share: Share, keys: list[str]) -> dict[str, str]:
    """Lower-cased NAME/VERSION or folder -> "named by job <id> (<state>)" for everything a job that has not
    finished will load: removing it would fail that job. Lower-cased because a case-insensitive share (SMB, NTFS)
    loads support/v2 for a job that wrote Support/v2, and keeping one too many is the safe side."""
    found: dict[str, list[str]] = {}
    for state, as_name, path in _unfinished_jobs(share):
        spec = _read_job(share, path, as_name)
        if spec is not None:
            for key in _job_names(spec, keys):
                found.setdefault(key.lower(), []).append(f"job {spec.id} ({state})")
        elif state in ARRIVING:
            for key in _mentioned(share, path, keys):
                found.setdefault(key, []).append(f"{path.name}, a job file that cannot be read yet ({state})")
    return {key: "named by " + ", ".join(jobs) for key, jobs in found.items()}


def _mentioned(share: Share, path: Path, keys: list[str]) -> list[str]:
    """The keys (lower-cased) that appear, as whole names, in the raw bytes of a job file that does not parse. In
    the inbox (or just taken from it) such a file is most often a copy still arriving in pieces: it will name
    what its text names, so those stay until intake has read or rejected it. Paths are compared in the spelling
    ``paths.canonical`` gives: a file written on Windows has ``models\\\\x`` in its JSON text."""
    try:
        text = read_limited(path, share.settings.max_job_bytes).decode("utf-8", "replace").lower()
    except (OSError, Rejected):
        return []
    text = re.sub(r"/(?:\./)+", "/", re.sub(r"[\\/]+", "/", text))  # models\\.\\x, models//x: models/x
    return [k.lower() for k in keys if re.search(rf"(?<![a-z0-9._-]){re.escape(k.lower())}(?![a-z0-9._-])", text)]


def gc(share: Share, remove: list[str] | None = None) -> GcReport:
    """Report what could be removed; with ``remove`` (NAME/VERSION or a merged model's folder, as a person typed
    them), remove those no rule keeps. Never the newest version of a name, never what a job that has not
    finished names (it would fail when it loads it), never an ancestor of a version that stays."""
    report = GcReport(kept={}, removable=[])
    _finish_earlier_runs(share, report)
    found, _ = manifests(share)
    all_refs = refs(share)
    by_ref = {str(r): m for r, m in found.items()}
    merged = {m.path: m for m in merged_models(share)}
    report.token_cache_bytes = _tree_bytes(share.root / TOKEN_CACHE)
    asked = _asked(share, remove or [], all_refs, by_ref, merged, report)
    everything = [str(r) for r in all_refs] + list(merged) + ([TOKEN_CACHE] if report.token_cache_bytes else [])
    keep = set(everything) - {d.key for d in asked.values()} if remove is not None else set()

    def decide() -> dict[str, str]:
        return _kept(all_refs, by_ref, keep, _named_by_jobs(share, everything), list(merged))

    report.kept = decide()
    report.removable = [key for key in everything if key not in report.kept]
    for text, doomed in list(asked.items()):
        if doomed.key in report.kept:
            report.refused[text] = f"kept: {report.kept[doomed.key]}"
            del asked[text]
    if asked:
        _apply(asked, decide, report)
    return report


def _asked(share: Share, remove: list[str], all_refs: list[Ref], by_ref: dict[str, Manifest],
           merged: dict[str, MergedNode], report: GcReport) -> dict[str, Doomed]:
    """What a person typed -> the exact version or merged model it names; anything else is refused, saying why."""
    asked: dict[str, Doomed] = {}
    for text in sorted(set(remove)):
        if text.rstrip("/") == TOKEN_CACHE and report.token_cache_bytes:
            try:  # datasets/ may be a link leading out of the share: gc removes nothing there
                folder = resolve_in_share(share.root, TOKEN_CACHE, "gc")
            except Rejected as e:
                report.refused[text] = e.problem
                continue
            asked[text] = Doomed(TOKEN_CACHE, folder, report.token_cache_bytes, "token cache")
            continue
        if (path := text.rstrip("/")) in merged:
            try:  # the listing follows no link below models/, but models/ itself may be one leading out
                folder = resolve_in_share(share.root, path, "gc")
            except Rejected as e:
                report.refused[text] = e.problem
                continue
            asked[text] = Doomed(path, folder, merged[path].size_bytes, "merged model")
            continue
        try:
            ref, _folder = resolve(share, text, "gc")
        except Rejected as e:
            report.refused[text] = (e.problem if ADAPTER_REF.match(text) else
                                    f"{text!r} is neither NAME/VERSION of a registered adapter, nor a merged model "
                                    f"folder that loraspool adapters lists, nor {TOKEN_CACHE} (when it holds files)")
            continue
        if ref not in all_refs or str(ref) != text:
            # A case-insensitive share (SMB, NTFS) finds "Support/v2" in support/v2: the rules speak of exact
            # names, so only an exact name may remove anything.
            report.refused[text] = "not a registered version under that exact name (names are case-sensitive)"
            continue
        manifest = by_ref.get(text)
        asked[text] = Doomed(text, version_dir(share, ref), manifest.size_bytes if manifest else 0, "adapter")
    return asked


def _apply(asked: dict[str, Doomed], decide: Callable[[], dict[str, str]], report: GcReport) -> None:
    """Hide them, look at the jobs again, put back what a job that came meanwhile names, delete the rest.
    gc takes no lock that a submitter honours, so a job may land after the first look. Once hidden, a version
    or model cannot be loaded by a job that comes later (that job is rejected, naming the field), and the second
    look finds any job that came in between."""
    hidden: dict[str, Path] = {}
    for text, doomed in asked.items():
        try:
            hidden[text] = _hide(doomed)
        except OSError as e:  # in use (Windows, SMB: a job has a file in it open). All or none: had its parent
            for other in asked:  # gone and it stayed, the rules would be broken
                report.refused[other] = f"not removed: {text} could not be moved aside, so nothing was"
            for back, folder in hidden.items():
                _put_back(folder, asked[back], back, report)
            report.refused[text] = f"could not be moved aside ({type(e).__name__}: {e}); try again when no job uses it"
            return
    try:
        late = decide()
    except Exception as e:  # the share failed mid-run: what was hidden goes back, or is reported where it is
        for text, doomed in asked.items():
            report.refused[text] = f"not removed: the jobs could not be read again ({type(e).__name__}: {e}); " \
                                   "try again"
            _put_back(hidden[text], doomed, text, report)
        return
    for text, doomed in asked.items():
        if doomed.key in late:
            report.refused[text] = f"kept: {late[doomed.key]} (it came while gc ran)"
            _put_back(hidden[text], doomed, text, report)
            continue
        # Decided: renamed first, so a gc stopped mid-removal leaves what the next gc finishes, not puts back.
        deleting = hidden[text].with_name(hidden[text].name.removesuffix(".tmp") + ".deleting.tmp")
        try:
            os.rename(hidden[text], deleting)
        except FileNotFoundError:
            report.refused[text] = "not removed: it was put back meanwhile (by a person?); run gc again"
            continue
        shutil.rmtree(deleting, ignore_errors=True)
        with contextlib.suppress(OSError):
            fsync_dir(deleting.parent)
        log.info("%s %s removed by gc --apply (%d bytes freed)", doomed.kind, text, doomed.size)
        report.freed_bytes += doomed.size
        report.removed.append(text)


def _put_back(hidden: Path, doomed: Doomed, text: str, report: GcReport) -> None:
    """Rename a hidden folder back. If the share refuses (a server gone mid-run), nothing is lost: the refusal
    says where the folder is and what to type."""
    try:
        os.rename(hidden, doomed.folder)
    except OSError as e:
        if isinstance(e, FileNotFoundError) and doomed.folder.exists():
            return  # put back meanwhile, as the message of a gc that was stopped says to
        log.error("%s %s stays moved aside at %s: %s", doomed.kind, text, hidden, e)
        report.refused[text] += (f"; it could not be put back ({type(e).__name__}: {e}) and is at {hidden}: "
                                 f"rename that folder to {doomed.folder.name} to restore it")


def _finish_earlier_runs(share: Share, report: GcReport) -> None:
    """What a gc stopped midway (kill -9, a closed laptop) left. A removal it had decided (``.deleting``) is
    finished: a person asked for it, and a gc running now would finish it the same way. A folder it hid and had
    not decided on is named, with what to type, but not put back: a gc running now may be deciding on it, and
    putting back part of its set would break its all-or-none rule (a child back, its parent gone)."""
    for path in _gc_hidden(share):
        m = GC_HIDDEN.match(path.name)
        assert m is not None
        shown = path.relative_to(share.root).as_posix()
        if m["deleting"]:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                report.finished.append(shown)
                log.info("%s: the removal an earlier gc decided is finished", shown)
            continue
        original = path.with_name(m["name"])
        report.refused[shown] = (f"hidden by a gc that was stopped before it decided, so no job can use it; unless "
                                 f"a gc is running now, rename it back to keep it (mv '{path}' '{original}'), or "
                                 "delete it to finish the removal")


def _gc_hidden(share: Share) -> Iterator[Path]:
    """Folders gc hid (``_hide``), where it hides them: beside adapter versions, merged models and the token
    cache. Links are not followed."""
    def hidden_in(folder: Path, depth: int) -> Iterator[Path]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if GC_HIDDEN.match(entry.name):
                yield Path(entry.path)
            elif depth > 0 and not entry.name.startswith("."):
                yield from hidden_in(Path(entry.path), depth - 1)

    for top, depth in ((share.root / ADAPTERS, 1), (share.root / "models", MERGED_DEPTH),
                       ((share.root / TOKEN_CACHE).parent, 0)):
        if link_below(share.root, top) is None:  # one linked out of the share: never remove anything through it
            yield from hidden_in(top, depth)


def _tree_bytes(folder: Path) -> int:
    """Bytes in the files below ``folder`` (0 when it is not there), links not followed."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _hide(doomed: Doomed) -> Path:
    """Rename it out of sight (a hidden name, which neither the registry nor the merged listing reads): a
    half-deleted folder is never a version or a model. Only ever called for what a person named."""
    hidden = doomed.folder.with_name(f".gc-{doomed.folder.name}-{uuid.uuid4().hex[:8]}.tmp")
    os.rename(doomed.folder, hidden)
    return hidden
