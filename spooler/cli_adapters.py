"""``loraspool`` subcommands for adapters (registered by ``spooler.cli``). Imports stay lazy: no torch at import.

``adapters``, ``gc`` and ``register`` never load torch, so they start fast on a laptop; ``verify``, ``compat``
and ``merge`` load tensors (``worker.adapter_verify``, ``worker.compat``, ``worker.merge``) and run locally, on
this machine's CPU unless ``--device cuda``. The same verify and merge run on a worker as ``kind: "verify"`` and
``kind: "merge"`` jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Command = Callable[[argparse.Namespace], int]


def add_parsers(sub: argparse._SubParsersAction, share_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add this group's subcommands to ``sub``; ``share_arg`` adds the usual --share option."""
    p = sub.add_parser("adapters", help="the adapter registry as a tree: sizes, eval losses, warnings")
    share_arg(p)
    p.add_argument("--json", action="store_true", help="the stable machine-readable format")

    p = sub.add_parser("verify", help="check an adapter: hashes, safetensors, keys, base identity, load, eval")
    p.add_argument("target", nargs="?", help="NAME/VERSION of a registered adapter, or any PEFT adapter folder")
    share_arg(p)
    p.add_argument("--chain", metavar="NAME", help="verify every version of NAME and every parent link")
    p.add_argument("--base", type=Path, help="base model folder (default: the manifest's, else the adapter "
                                             "config's base_model_name_or_path)")
    p.add_argument("--dataset", type=Path, nargs="+", help="JSONL file(s): also check the eval loss")
    p.add_argument("--eval-tolerance", type=float, default=0.05, help="allowed eval loss difference, as a fraction")
    p.add_argument("--rehash", action="store_true", help="hash the base again instead of trusting the cache")
    _device_and_json(p)

    p = sub.add_parser("compat", help="can two adapters be combined? rules and a merge risk from 0 to 100")
    p.add_argument("a")
    p.add_argument("b")
    share_arg(p)
    p.add_argument("--combination", default="cat", choices=["linear", "cat", "svd", "ties", "dare_linear"])
    p.add_argument("--weights", type=float, nargs=2, metavar=("WA", "WB"), default=(1.0, 1.0))
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("merge", help="merge an adapter into its base, or several into one new adapter version")
    p.add_argument("adapters", nargs="+", help="NAME/VERSION of each input")
    share_arg(p)
    p.add_argument("--into", choices=["base", "adapter"], required=True)
    p.add_argument("--combination", default="cat", choices=["linear", "cat", "svd", "ties", "dare_linear"])
    p.add_argument("--weights", type=float, nargs="+", help="one per adapter (default 1.0 each)")
    p.add_argument("--density", type=float, help="ties and dare_linear: the fraction of each update kept")
    p.add_argument("--name", help="into adapter: register the result under this name (default: the first input's)")
    p.add_argument("--out", help="into base: the new model folder, relative to the share "
                                 "(default models/merged/NAME-VERSION)")
    _device_and_json(p)

    p = sub.add_parser("gc", help="report which adapter versions, merged models and caches could be removed; "
                                  "--apply removes those named")
    share_arg(p)
    p.add_argument("--apply", nargs="+", metavar="NAME/VERSION|FOLDER",
                   help="remove these versions, merged model folders, or datasets/.tokens (only those no rule "
                        "keeps: never a newest version, never a parent, never one an unfinished job names)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("register", help="register a succeeded train job's adapter (results/<id>/adapter)")
    p.add_argument("job_id")
    share_arg(p)


def _device_and_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to load the models")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _share_or_none(args: argparse.Namespace):  # noqa: ANN202 - Share | None, imported lazily
    from spooler.share import Share

    return Share.open(args.share) if args.share else None


def _share(args: argparse.Namespace):  # noqa: ANN202 - Share, imported lazily
    from spooler.share import ShareError

    share = _share_or_none(args)
    if share is None:
        raise ShareError("no share given: pass --share PATH or set LORASPOOL_SHARE")
    return share


def _fail(cmd: str, message: str) -> int:
    print(f"loraspool {cmd}: {message}", file=sys.stderr)
    return 2


def _print(record: Any, as_json: bool, text: str) -> None:
    print(record.model_dump_json(indent=2) if as_json else text)


# ── adapters, gc, register: no torch ─────────────────────────────────────────────────────────────────────
def cmd_adapters(args: argparse.Namespace) -> int:
    from spooler import registry

    tree = registry.listing(_share(args))
    _print(tree, args.json, registry.render(tree))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from spooler import registry

    report = registry.gc(_share(args), args.apply)
    _print(report, args.json, _render_gc(report, applying=args.apply is not None))
    return 1 if report.refused else 0


def _render_gc(report: Any, applying: bool) -> str:
    from spooler.registry import human

    lines = [f"finished removing {r}, which an earlier gc had decided" for r in report.finished]
    lines += [f"removed {r}" for r in report.removed]
    lines += [f"refused {r}: {why}" for r, why in sorted(report.refused.items())]
    if applying:
        lines.append(f"freed {human(report.freed_bytes)}")
        return "\n".join(lines)
    lines += [f"could remove {r}{_cache_note(r, report)}" for r in report.removable] or ["nothing could be removed"]
    lines += [f"keeps {r}: {why}" for r, why in sorted(report.kept.items())]
    lines.append("nothing was removed; to remove, name them: loraspool gc --apply NAME/VERSION|FOLDER ...")
    return "\n".join(lines)


def _cache_note(name: str, report: Any) -> str:
    from spooler.registry import human
    from spooler.share import TOKEN_CACHE

    if name != TOKEN_CACHE:
        return ""
    return f" ({human(report.token_cache_bytes)} of tokenized rows, only a cache: the next job tokenizes again)"


def cmd_register(args: argparse.Namespace) -> int:
    from schemas.result import Result
    from spooler import registry
    from spooler.errors import Rejected
    from spooler.jobfile import parse_spec
    from spooler.share import read_model

    share = _share(args)
    folder = share.result_dir(args.job_id)
    result = read_model(folder / "result.json", Result)
    if result is None or result.status.value != "succeeded" or result.kind not in (None, "train"):
        return _fail("register", f"{args.job_id} has no succeeded train result in {folder}")
    try:
        spec = parse_spec((folder / "job.json").read_bytes(), f"{args.job_id}.json", share.settings.max_job_bytes)
        spec.id = args.job_id
        ref = registry.register_from_result(share, result, spec)
    except (OSError, Rejected, registry.RegistryError) as e:
        return _fail("register", str(e))
    print(ref)
    return 0


# ── verify, compat, merge: load tensors ──────────────────────────────────────────────────────────────────
def _quiet() -> None:
    from worker.engine import quiet_libraries

    quiet_libraries()


def cmd_verify(args: argparse.Namespace) -> int:
    from spooler.errors import Rejected

    if (args.chain is None) == (args.target is None):
        return _fail("verify", "give an adapter (NAME/VERSION or a folder) or --chain NAME, not both")
    _quiet()
    try:
        if args.chain is not None:
            return _verify_chain(args)
        return _verify_one(args)
    except Rejected as e:
        return _fail("verify", f"{e.problem}")


def _verify_one(args: argparse.Namespace) -> int:
    from schemas.job import ADAPTER_REF
    from worker.adapter_verify import folder_target, registered_target, verify

    share = _share_or_none(args)
    base, folder = _on_share(share, args.base), _on_share(share, Path(args.target))
    dataset = [_on_share(share, d) for d in args.dataset] if args.dataset else None
    options = {"base": base, "dataset": dataset, "tolerance": args.eval_tolerance, "rehash": args.rehash}
    if share is not None and ADAPTER_REF.match(args.target) and not os.path.isdir(args.target):
        target = registered_target(share, args.target, "adapter", **options)
    elif folder is not None and folder.is_dir():
        target = folder_target(folder.resolve(), args.target, share, **options)
    else:
        hint = "" if share is not None else " (to name a registered NAME/VERSION, pass --share)"
        return _fail("verify", f"{args.target!r} is not a folder{hint}")
    report = verify(target, args.device)
    _print(report, args.json, render_report(report))
    return 0 if report.ok else 1


def _verify_chain(args: argparse.Namespace) -> int:
    from worker.adapter_verify import verify_chain

    share = _share(args)
    dataset = [_on_share(share, d) for d in args.dataset] if args.dataset else None
    chain = verify_chain(share, args.chain, args.device, dataset, args.eval_tolerance, args.rehash)
    text = "\n\n".join(render_report(r) for r in chain.versions)
    text += "\n\n" + "\n".join(f"{c.status.value.upper():4} {c.name}: {c.reason}" for c in chain.links)
    text += f"\n\nchain {chain.name}: {'OK' if chain.ok else 'FAILED'}"
    _print(chain, args.json, text)
    return 0 if chain.ok else 1


def _on_share(share: Any, value: Path | None) -> Path | None:
    """A path as given when it exists from here, else relative to the share when it exists there: README's
    examples (--dataset datasets/x.jsonl, --base models/y) are share paths, whatever the current folder."""
    if value is None or share is None or value.is_absolute() or value.exists():
        return value
    there = share.root / value
    return there if there.exists() else value


def render_report(report: Any) -> str:
    lines = [f"{report.target} (base {report.base or '?'})"]
    lines += [f"  {c.status.value.upper():4} {c.name}: {c.reason}" for c in report.checks]
    lines.append(f"  {'OK: every check passed' if report.ok else 'FAILED'}")
    return "\n".join(lines)


def _side(share: Any, text: str, weight: float) -> Any:
    from schemas.job import ADAPTER_REF
    from spooler import registry
    from spooler.share import read_model
    from worker.compat import Side

    if share is not None and ADAPTER_REF.match(text) and not os.path.isdir(text):
        ref, folder = registry.resolve(share, text, "adapter")
        return Side(text, folder, registry.read_manifest(share, ref), weight)
    from schemas.adapter import MANIFEST, Manifest

    folder = Path(text)
    return Side(text, folder, read_model(folder / MANIFEST, Manifest), weight)


def cmd_compat(args: argparse.Namespace) -> int:
    from spooler.errors import Rejected
    from worker.compat import compat

    share = _share_or_none(args)
    try:
        a, b = _side(share, args.a, args.weights[0]), _side(share, args.b, args.weights[1])
    except Rejected as e:
        return _fail("compat", e.problem)
    for side in (a, b):
        if not side.folder.is_dir():
            return _fail("compat", f"{side.label!r} is not an adapter folder or a registered NAME/VERSION")
    report = compat(a, b, args.combination)
    text = "\n".join([f"{report.a} + {report.b} ({report.combination}): "
                      f"{'compatible' if report.compatible else 'NOT compatible'}, merge risk {report.risk}/100",
                      *(f"  {c.status.value.upper():4} {c.name}: {c.reason}" for c in report.checks),
                      *(f"  risk: {r}" for r in report.reasons)])
    _print(report, args.json, text)
    return 0 if report.compatible else 1


def _as_flags(message: str) -> str:
    """A merge typed on the command line: name the flags a person used, not the job-file fields they set."""
    for field, flag in (("merge.output", "--out"), ("register_as", "--name"), ("merge.weights", "--weights"),
                        ("merge.density", "--density"), ("merge.combination", "--combination")):
        message = message.replace(field, flag)
    return message


def cmd_merge(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from schemas.job import JobSpec
    from spooler.errors import Rejected, validation_problems
    from worker.adapter_jobs import merge_job
    from worker.train import TrainRequest

    share = _share(args)
    merge = {"adapters": args.adapters, "into": args.into, "weights": args.weights, "density": args.density,
             "output": args.out}
    if args.into == "adapter":
        merge["combination"] = args.combination
    try:
        job = JobSpec(kind="merge", merge={k: v for k, v in merge.items() if v is not None}, register_as=args.name)
    except ValidationError as e:
        return _fail("merge", _as_flags(validation_problems(e.errors())))
    _quiet()
    request = TrainRequest(job=job, model_dir=None, datasets=[], share_root=share.root, out_dir=share.tmp,
                           device=args.device, file_mode=share.file_mode)
    try:
        outcome = merge_job(share, request, lambda _p: None, lambda: False)
    except Rejected as e:
        return _fail("merge", _as_flags(str(e)))
    doc = {"ok": outcome.ok, "error": outcome.error, "registered": outcome.registered,
           "merged_model": outcome.merged_model, "notes": outcome.notes,
           "verify": outcome.verify.model_dump(mode="json") if outcome.verify else None}
    made = outcome.registered or outcome.merged_model
    text = "\n".join([f"{'made' if outcome.ok else 'FAILED'}: {made}", *(f"  note: {n}" for n in outcome.notes),
                      *([f"  error: {outcome.error}"] if outcome.error else [])])
    print(json.dumps(doc, indent=2) if args.json else text)
    return 0 if outcome.ok else 1


COMMANDS: dict[str, Command] = {"adapters": cmd_adapters, "verify": cmd_verify, "compat": cmd_compat,
                                "merge": cmd_merge, "gc": cmd_gc, "register": cmd_register}
