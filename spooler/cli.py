"""The ``loraspool`` command. Subcommands import lazily, so ``submit`` and ``status`` start fast on a laptop."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from spooler import __version__, cli_adapters, cli_deploy
from spooler.clock import SystemClock

GROUPS = (cli_adapters, cli_deploy)  # subcommands kept beside their subject: adapters, deployment


def _share_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--share", default=os.environ.get("LORASPOOL_SHARE"),
                   help="the share's root folder (default: $LORASPOOL_SHARE)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loraspool", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--version", action="version", version=f"loraspool {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("init", help="create a share's layout and settings (idempotent)")
    p.add_argument("share", help="the share's root folder")
    p.add_argument("--heartbeat-interval", type=float, help="seconds between a worker's heartbeats (default 2)")
    p.add_argument("--stale-after", type=float,
                   help="seconds without a heartbeat's seq advancing before a worker counts as dead (default 15; "
                        "at least twice the heartbeat interval)")
    p.add_argument("--max-attempts", type=int,
                   help="attempts before a job whose worker or training process died each time fails (default 3)")
    p.add_argument("--file-mode", help='octal mode for files the system writes, e.g. "0664"')
    p.add_argument("--dir-mode", help='octal mode for folders the system makes, e.g. "0775"')
    p.add_argument("--submit-fallback", choices=["auto", "never"],
                   help="what submit does when no worker is live, unless its --fallback says: auto runs the job on "
                        "the submitting machine's CPU (the default), never leaves it queued (for a planned stop of "
                        "the GPU worker)")

    p = sub.add_parser("worker", help="run a worker in the foreground until SIGTERM or SIGINT")
    cli_deploy.worker_args(p)

    p = sub.add_parser("submit", help="validate a job file and drop it into the inbox")
    p.add_argument("job", type=Path)
    _share_arg(p)
    p.add_argument("--wait", action="store_true",
                   help="show progress until the job ends; exit non-zero unless it succeeded. Without it, submit "
                        "returns once the job is dropped, unless no worker is live and --fallback is auto: then it "
                        "runs the job on a local CPU worker and waits anyway")
    p.add_argument("--fallback", choices=["auto", "never"],
                   help="auto: run a local CPU worker when no worker's heartbeat is fresh; never: leave the job "
                        "queued. Default: the share's submit_fallback (auto unless `loraspool init --submit-fallback`"
                        " changed it)")
    p.add_argument("--no-check", action="store_true",
                   help="drop the job even if its base_model or dataset is not on the share yet (still being "
                        "copied, or made by a job still queued, such as a merge)")

    p = sub.add_parser("status", help="workers, queued and running jobs, recent results")
    _share_arg(p)
    p.add_argument("--json", action="store_true", help="the stable machine-readable format")
    p.add_argument("--no-wait", action="store_true", help="never watch heartbeats, even briefly")

    p = sub.add_parser("cancel", help="cancel a job: queued at once, running at its next step")
    p.add_argument("id")
    _share_arg(p)

    p = sub.add_parser("ping", help="round trip of a probe job through the workers")
    _share_arg(p)
    p.add_argument("--timeout", type=float, default=60.0)

    p = sub.add_parser("demo", help="a whole run on a temp share with a tiny model built on the spot")
    p.add_argument("--keep", type=Path, help="use this new or empty folder as the share (a later demo reuses it); "
                                             "without it, a new temp folder is made each time and left for you to "
                                             "look at")
    p.add_argument("--steps", type=int, default=30, help="training steps of the demo job (default 30)")

    p = sub.add_parser("schema", help="write the JSON Schemas of every record on the share")
    p.add_argument("--out", type=Path, default=None, help="folder (default: the package's schemas/json)")
    for group in GROUPS:
        group.add_parsers(sub, _share_arg)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from spooler.logs import setup_logging

    setup_logging(args.verbose)
    from spooler.errors import Rejected
    from spooler.share import ShareError

    try:
        code = COMMANDS[args.cmd](args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except BrokenPipeError:  # `loraspool status | head`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except Rejected as e:
        print(f"loraspool: job rejected: {e}", file=sys.stderr)
        return 2
    except ShareError as e:
        print(f"loraspool: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # the share dropped, or a folder of it is not what it should be: a sentence, no traceback
        print(f"loraspool {args.cmd}: {e}; is the share mounted and writable? `loraspool doctor --share SHARE` "
              "checks it", file=sys.stderr)
        return 1


def _share(args: argparse.Namespace):  # noqa: ANN202 - Share, imported lazily
    from spooler.share import Share, ShareError

    if not args.share:
        raise ShareError("no share given: pass --share PATH or set LORASPOOL_SHARE")
    return Share.open(args.share)


def cmd_init(args: argparse.Namespace) -> int:
    from spooler.share import init_share

    share = init_share(args.share, heartbeat_interval=args.heartbeat_interval, stale_after=args.stale_after,
                       max_attempts=args.max_attempts, file_mode=args.file_mode, dir_mode=args.dir_mode,
                       submit_fallback=args.submit_fallback)
    print(f"share ready at {share.root}: {share.settings.model_dump_json()}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from spooler.config import ConfigError, resolve
    from spooler.logs import setup_logging
    from spooler.share import Share

    try:
        cfg, _sources = resolve(cli_deploy.worker_flags(args))
    except ConfigError as e:
        print(f"loraspool worker: {e}", file=sys.stderr)
        return 2
    setup_logging(args.verbose, cfg.log_file, cfg.log_max_bytes, cfg.log_backups)
    from worker.daemon import run_worker

    return run_worker(Share.open(cfg.share), cfg)


def cmd_submit(args: argparse.Namespace) -> int:
    from spooler import submit

    share = _share(args)
    try:
        job_id = submit.drop(share, args.job, check_inputs=not args.no_check)
    except submit.SubmitError as e:
        print(f"loraspool submit: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"loraspool submit: cannot read {args.job} or write the inbox: {e}", file=sys.stderr)
        return 2
    print(job_id, flush=True)
    fallback = (args.fallback or share.settings.submit_fallback) == "auto"
    if args.fallback is None and not fallback and not args.wait and not submit.live_workers(share, SystemClock()):
        print(f"loraspool submit: no worker is live, and the share says submit_fallback = never (a planned stop?): "
              f"job {job_id} waits in the spool for a worker. --fallback auto runs it here instead", file=sys.stderr)
    if not args.wait and not (fallback and not submit.live_workers(share, SystemClock())):
        return 0
    try:
        result = submit.wait_for(share, job_id, SystemClock(), fallback)
    except KeyboardInterrupt:
        print(f"loraspool submit: stopped waiting. Job {job_id} stays in the spool for a worker to take; "
              f"`loraspool status` follows it, `loraspool cancel {job_id}` ends it", file=sys.stderr)
        return 130
    print(result.model_dump_json(indent=2))
    return submit.exit_code(result)


def cmd_status(args: argparse.Namespace) -> int:
    from spooler import status

    doc = status.gather(_share(args), SystemClock(), wait=not args.no_wait)
    print(json.dumps(doc, indent=2) if args.json else status.render(doc))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from spooler.cancel import request_cancel

    print(request_cancel(_share(args), args.id, SystemClock()))
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    import socket
    import tempfile

    from spooler import submit

    share = _share(args)
    if not submit.live_workers(share, SystemClock()):
        print(f"loraspool ping: no worker's heartbeat on {share.root} is fresh; waiting {args.timeout:g}s anyway",
              file=sys.stderr)
    job_id = f"ping-{socket.gethostname().split('.')[0][:20]}-{os.getpid()}-{int(time.time())}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{job_id}.json"
        path.write_text(json.dumps({"id": job_id, "kind": "probe", "priority": 1000}))
        t0 = time.monotonic()
        submit.drop(share, path)
    while time.monotonic() - t0 < args.timeout:
        result = submit.find_result(share, job_id)
        if result is not None:
            rtt = time.monotonic() - t0
            print(f"{job_id}: {result.status.value} by worker {result.worker} on {result.host} in {rtt:.3f}s")
            return 0
        time.sleep(0.05)
    from spooler.cancel import request_cancel

    said = request_cancel(share, job_id, SystemClock())  # a probe that runs an hour later answers nobody
    print(f"{job_id}: no worker answered in {args.timeout:g}s; is a worker running? try: loraspool status "
          f"(the probe: {said})", file=sys.stderr)
    return 1


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(args.keep, args.steps)


def cmd_schema(args: argparse.Namespace) -> int:
    from schemas.export import export

    for path in export(args.out):
        print(path)
    return 0


COMMANDS = {"init": cmd_init, "worker": cmd_worker, "submit": cmd_submit, "status": cmd_status,
            "cancel": cmd_cancel, "ping": cmd_ping, "demo": cmd_demo, "schema": cmd_schema}
for _group in GROUPS:
    COMMANDS.update(_group.COMMANDS)

if __name__ == "__main__":
    sys.exit(main())
