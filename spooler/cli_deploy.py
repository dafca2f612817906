"""``loraspool`` subcommands for deploy (registered by ``spooler.cli``). Imports stay lazy: no torch at import.

    loraspool config show [--json]                   the worker's settings, and where each one came from
    loraspool service install|uninstall|status|start|stop|remove
                                                     systemd on Linux, a Windows service on Windows
    loraspool doctor [--share P] [--json]            what to fix on this machine before it runs jobs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

Command = Callable[[argparse.Namespace], int]

WORKER_FLAGS = ("config", "share", "id", "device", "watch", "devices", "max_concurrent_jobs", "allowed_model_roots",
                "cache_dir", "cache_models", "log_file", "quiet_hours", "stall_minutes", "cpu_quantization",
                "gpu_memory_gib", "only_job", "fallback")


def worker_args(p: argparse.ArgumentParser) -> None:
    """The worker's settings as flags; each overrides $LORASPOOL_* and loraspool.toml (see spooler.config)."""
    p.add_argument("--config", type=Path,
                   help="settings file (default: $LORASPOOL_CONFIG, else /etc/loraspool/loraspool.toml or "
                        "%%ProgramData%%\\loraspool\\loraspool.toml, if it exists)")
    # No default from the environment here: spooler.config reads it, so `config show` can say where it came from.
    p.add_argument("--share", help="the share's root folder (default: $LORASPOOL_SHARE, then the file)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"])
    p.add_argument("--id", help="worker id (default: the host name)")
    p.add_argument("--watch", choices=["auto", "native", "polling"],
                   help="folder watcher; auto uses polling on network filesystems")
    p.add_argument("--devices", help='GPUs this worker may use, "0,1" or "all" (default: all)')
    p.add_argument("--max-concurrent-jobs", type=int, help="jobs at once (default: one per usable GPU)")
    p.add_argument("--allowed-model-root", dest="allowed_model_roots", action="append",
                   help="a share folder base models may come from (repeat it; default: anywhere in the share)")
    p.add_argument("--cache-dir", type=Path, help="local folder for verified copies of base models")
    p.add_argument("--cache-models", action=argparse.BooleanOptionalAction, default=None,
                   help="copy base models to the local cache before training (default: yes)")
    p.add_argument("--log-file", type=Path, help="also log JSON lines to this file, rotated")
    p.add_argument("--quiet-hours", help='no new claims in these local hours, e.g. "22:00-07:00"')
    p.add_argument("--stall-minutes", type=float,
                   help="end a job whose training reports no progress for this long (default 60; 0: never)")
    p.add_argument("--cpu-quantization", choices=["plain", "bitsandbytes"],
                   help="on CPU, train 4bit/8bit jobs as plain LoRA (default) or quantized with bitsandbytes")
    p.add_argument("--gpu-memory-gib", type=float,
                   help="use at most this much of each GPU's memory (default: all of it)")
    p.add_argument("--only", dest="only_job", help=argparse.SUPPRESS)
    p.add_argument("--fallback", action="store_true", default=None, help=argparse.SUPPRESS)


def worker_flags(args: argparse.Namespace) -> dict[str, object]:
    return {k: getattr(args, k, None) for k in WORKER_FLAGS}


def add_parsers(sub: argparse._SubParsersAction, share_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add this group's subcommands to ``sub``; ``share_arg`` adds the usual --share option."""
    p = sub.add_parser("config", help="the worker's settings: loraspool.toml, $LORASPOOL_*, flags")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the merged settings and where each value came from")
    worker_args(show)
    show.add_argument("--json", action="store_true", help="machine-readable")

    p = sub.add_parser("service", help="run the worker as a service: systemd on Linux, a Windows service")
    p.add_argument("action", choices=["install", "uninstall", "remove", "status", "start", "stop"])
    p.add_argument("--share", help="the share (a mount point; on Windows a UNC path \\\\server\\share\\...)")
    p.add_argument("--id", help="worker id (default: from loraspool.toml, else the host name)")
    p.add_argument("--config", type=Path, help="settings file the service reads (default: the per-OS one)")
    p.add_argument("--user", help="account the worker runs as (Linux default: loraspool; Windows: LocalSystem, "
                                  "or .\\name / DOMAIN\\name, asked for its password)")
    p.add_argument("--password", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, help="Linux: model cache (default /var/cache/loraspool)")
    p.add_argument("--log-file", type=Path, help="Linux: JSON log file (default: the journal only)")
    p.add_argument("--unit-dir", type=Path, default=None, help="Linux: where the unit goes (/etc/systemd/system)")
    p.add_argument("--no-enable", action="store_true", help="Linux: write the unit, do not enable or start it")

    p = sub.add_parser("doctor", help="check this machine and the share, and say what to fix")
    p.add_argument("--share", help="the share (default: from the worker's settings)")
    p.add_argument("--config", type=Path, help="the worker's settings file")
    p.add_argument("--json", action="store_true", help="machine-readable")


# ── config show ─────────────────────────────────────────────────────────────────────────────────────
def cmd_config(args: argparse.Namespace) -> int:
    import os

    from spooler.config import ConfigError, config_path, resolve

    flags = worker_flags(args)
    path, named_by = config_path(flags, os.environ)
    try:
        cfg, sources = resolve(flags)
    except ConfigError as e:
        print(f"loraspool config: {e}", file=sys.stderr)
        return 2
    values = cfg.model_dump(mode="json", exclude={"fallback", "only_job"})
    file_state = "read" if path.is_file() else "not found; defaults apply"
    if args.json:
        doc = {"config_file": str(path), "config_file_found": path.is_file(), "settings": values,
               "sources": {k: sources[k] for k in values}}
        print(json.dumps(doc, indent=2))
        return 0
    print(f"config file: {path} ({file_state}{'' if named_by is None else f', from {named_by}'})")
    width = max(map(len, values))
    for key, value in values.items():
        shown = "(unset)" if value is None else json.dumps(value) if not isinstance(value, str) else value
        print(f"{key:<{width}} = {shown:<40} # {sources[key]}")
    return 0


# ── service ─────────────────────────────────────────────────────────────────────────────────────────
def cmd_service(args: argparse.Namespace) -> int:
    if sys.platform == "win32":
        return _service_windows(args)
    return _service_linux(args)


def _service_settings(args: argparse.Namespace):  # noqa: ANN202 - WorkerSettings, imported lazily
    """The settings the service will start with, so install fails now, not at boot."""
    from spooler.config import resolve

    return resolve({"share": args.share, "id": args.id, "config": args.config})[0]


def _service_linux(args: argparse.Namespace) -> int:
    from spooler import service_linux as sl
    from spooler.config import ConfigError

    unit_dir = args.unit_dir or sl.UNIT_DIR
    try:
        if args.action == "install":
            return _install_linux(_unit_spec(args), unit_dir, enable=not args.no_enable)
        if args.action in ("uninstall", "remove"):
            return _uninstall_linux(unit_dir)
        if args.action == "status":
            return _status_linux(unit_dir)
        code, out = sl.systemctl(args.action, sl.UNIT_NAME)
        print(out or f"systemctl {args.action} {sl.UNIT_NAME}: done")
        return 0 if code == 0 else 1
    except (ConfigError, sl.ServiceError) as e:
        print(f"loraspool service {args.action}: {e}", file=sys.stderr)
        return 2


def _unit_spec(args: argparse.Namespace):  # noqa: ANN202 - UnitSpec, imported lazily
    """The unit for these settings. A cache or log path from loraspool.toml only needs write access in the
    unit; one given to install as a flag or variable (the service would not see it) is also set there."""
    from spooler import service_linux as sl
    from spooler.config import resolve

    config = _absolute(args.config)  # the service starts in /, and paths in the file are relative to it
    flags = {"share": args.share, "id": args.id, "config": config, "cache_dir": args.cache_dir,
             "log_file": args.log_file}
    cfg, sources = resolve(flags)
    kept = {k: not sources[k].startswith(("file", "default", "host")) for k in ("cache_dir", "log_file")}
    cache = _absolute(cfg.cache_dir) if not sources["cache_dir"].startswith("default") else None
    log_file = _absolute(cfg.log_file)
    environment = {}
    if kept["cache_dir"]:
        environment["LORASPOOL_CACHE_DIR"] = str(cache)
    if kept["log_file"] and log_file is not None:
        environment["LORASPOOL_LOG_FILE"] = str(log_file)
    return sl.UnitSpec(share=_absolute(cfg.share), worker_id=cfg.id, user=args.user or "loraspool", config=config,
                       writable=sl.writable_paths(cache, log_file), environment=environment)


def _absolute(path: Path | str | None) -> Path | None:
    """Absolute and without "..": systemd ignores a relative or unnormalized path in ReadWritePaths= and
    RequiresMountsFor= (so the unit would lose its mount ordering), and the service's working folder is /.
    Links are kept, not resolved: a mount point is named as the person named it."""
    return None if path is None else Path(os.path.abspath(path))


def _install_linux(spec, unit_dir: Path, enable: bool) -> int:  # noqa: ANN001 - UnitSpec, imported lazily
    from spooler import service_linux as sl

    if problems := sl.problems(spec):
        for p in problems:
            print(f"loraspool service install: {p}", file=sys.stderr)
        return 2
    sl.make_writable(spec)
    text = sl.render(spec)
    with tempfile.TemporaryDirectory() as scratch:  # checked before it is installed: a unit systemd would
        checked = sl.verify(sl.write_unit(text, Path(scratch)))  # half-ignore never replaces a working one
    if checked is not None and (checked[0] != 0 or checked[1]):
        print(f"systemd-analyze verify says:\n{checked[1]}\nnothing was installed", file=sys.stderr)
        return 1
    path = sl.write_unit(text, unit_dir)
    print(f"wrote {path}")
    if not enable:
        print(f"enable it with: systemctl daemon-reload && systemctl enable {sl.UNIT_NAME} && "
              f"systemctl restart {sl.UNIT_NAME}")
        return 0
    # restart, not enable --now: a worker already running (install run again after a change) must pick up the
    # new unit. Its SIGTERM checkpoints the job it has and gives it back to the queue.
    for step in (("daemon-reload",), ("enable", sl.UNIT_NAME), ("restart", sl.UNIT_NAME)):
        code, out = sl.systemctl(*step)
        if code != 0:
            print(f"systemctl {' '.join(step)} failed: {out}; run it by hand once fixed", file=sys.stderr)
            return 1
    print(f"{sl.UNIT_NAME} enabled and (re)started; follow it with: journalctl -u {sl.UNIT_NAME} -f")
    return 0


def _uninstall_linux(unit_dir: Path) -> int:
    from spooler import service_linux as sl

    if unit_dir == sl.UNIT_DIR:
        sl.systemctl("disable", "--now", sl.UNIT_NAME)  # SIGTERM: the worker checkpoints and gives its job back
    removed = sl.remove_unit(unit_dir)
    if unit_dir == sl.UNIT_DIR:
        sl.systemctl("daemon-reload")
    print(f"removed {removed}" if removed else f"no {sl.UNIT_NAME} in {unit_dir}: nothing to remove")
    return 0


def _status_linux(unit_dir: Path) -> int:
    from spooler import service_linux as sl

    path = unit_dir / sl.UNIT_NAME
    if not path.exists():
        print(f"{sl.UNIT_NAME} is not installed (no {path}); install it with: loraspool service install --share ...")
        return 3
    print(f"unit file: {path}")
    _, enabled = sl.systemctl("is-enabled", sl.UNIT_NAME)
    code, active = sl.systemctl("is-active", sl.UNIT_NAME)
    print(f"enabled: {enabled}\nactive: {active}\nlogs: journalctl -u {sl.UNIT_NAME}")
    return 0 if code == 0 else 3


def _service_windows(args: argparse.Namespace) -> int:  # pragma: no cover - Windows only, not run in CI
    from spooler.config import ConfigError
    from worker import winservice

    try:
        if args.action == "install":
            cfg = _service_settings(args)
            print(winservice.install(str(cfg.share), cfg.id, str(args.config) if args.config else None, args.user,
                                     args.password))
            print("start it with: loraspool service start   (it also starts at boot)")
            return 0
        action = {"uninstall": winservice.remove, "remove": winservice.remove, "status": winservice.status,
                  "start": winservice.start, "stop": winservice.stop}[args.action]
        print(action())
        return 0
    except ConfigError as e:
        print(f"loraspool service {args.action}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # pywintypes.error: access denied, no such service...
        print(f"loraspool service {args.action}: {e}; run it from an Administrator prompt", file=sys.stderr)
        return 1


# ── doctor ──────────────────────────────────────────────────────────────────────────────────────────
def cmd_doctor(args: argparse.Namespace) -> int:
    import os

    from spooler import doctor
    from spooler.config import ConfigError, default_cache_dir, resolve

    share: Path | None = Path(args.share) if args.share else None
    cache_dir, problem = default_cache_dir(), None
    try:
        cfg, _ = resolve({"share": args.share, "config": args.config})
        share, cache_dir = cfg.share, cfg.cache_dir
    except ConfigError as e:
        problem = str(e)
        if share is None and os.environ.get("LORASPOOL_SHARE"):
            share = Path(os.environ["LORASPOOL_SHARE"])
    checks = doctor.run_checks(share, cache_dir, config_problem=problem)
    print(json.dumps(doctor.as_json(checks), indent=2) if args.json else doctor.render(checks))
    return 0 if doctor.as_json(checks)["ok"] else 1


COMMANDS: dict[str, Command] = {"config": cmd_config, "service": cmd_service, "doctor": cmd_doctor}
