"""The worker as a Windows service: the decisions, kept apart from the win32 calls so they run in CI.

``worker/winservice.py`` is the thin part that imports pywin32 and talks to the service control manager.
Everything that can be decided without Windows is here, judged on ``PureWindowsPath`` and with the win32
calls passed in as plain functions, which tests replace with fakes.

Two Windows facts shape it:

* A service runs in its own logon session. Drive letters a person mapped (``net use Z: \\\\server\\share``)
  exist only in that person's session: the service sees no ``Z:``. The share must be a UNC path, and a
  mapped letter is caught at install time, while the person's mapping is still visible to look up.
* ``pythonservice.exe`` (pywin32's service host) runs the base Python, not the venv's: the service's own
  environment (the ``Environment`` value of its registry key) puts the venv's packages on ``PYTHONPATH``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path, PureWindowsPath
from typing import Any

log = logging.getLogger(__name__)

SERVICE_NAME = "loraspool-worker"
DISPLAY_NAME = "loraspool worker"
DESCRIPTION = "Trains LoRA adapters for jobs dropped on the loraspool share; see deploy/README.md."
CLASS_STRING = "worker.winservice.LoraspoolService"
OPTIONS = ("share", "id", "config")  # stored under the service's Parameters registry key
STOP_WAIT_HINT_MS = 30_000  # re-reported while the worker checkpoints, so the SCM keeps waiting
# GetDriveType / QueryServiceStatus codes, so this module needs no pywin32.
STATES = {1: "stopped", 2: "start pending", 3: "stop pending", 4: "running", 5: "continue pending",
          6: "pause pending", 7: "paused"}

MappedDrive = Callable[[str], "str | None"]  # "Z:" -> "\\\\server\\share" ("" when remote, target unknown), or None


def unc_problem(share: str, mapped_drive: MappedDrive) -> str | None:
    """Why ``share`` will not work for a service, with the path to use instead; None when it will."""
    p = PureWindowsPath(share)
    if p.drive.startswith(("\\\\.\\", "\\\\?\\")) and not p.drive.upper().startswith("\\\\?\\UNC\\"):
        if len(p.drive) == 6 and p.drive[4:].endswith(":"):  # \\?\C: is a local disk, written the long way
            return _drive_problem(share, p.drive[4:], p, mapped_drive)
        return f"{share} is a device path; give the share as a UNC path, like \\\\server\\share\\loraspool"
    if p.drive.startswith("\\\\"):
        return None
    if share.startswith(("\\\\", "//")):
        return f"{share} names a server but no share; write it as \\\\server\\share\\folder"
    if len(p.drive) == 2 and p.drive.endswith(":"):
        return _drive_problem(share, p.drive, p, mapped_drive)
    return f"{share} is not an absolute path; give the share as a UNC path, like \\\\server\\share\\loraspool"


def _drive_problem(share: str, drive: str, p: PureWindowsPath, mapped_drive: MappedDrive) -> str | None:
    if not p.root:
        return f"{share} has no '\\' after {drive}; write {drive}\\{str(p)[len(drive):]}"
    target = mapped_drive(drive.upper())
    if target is None:
        return None  # a local disk: the worker runs on the machine that holds the share
    rest = p.parts[1:]
    unc = str(PureWindowsPath(target or "\\\\server\\share", *rest))
    return (f"{share} is on {drive.upper()}, a mapped network drive: Windows services do not see drive letters "
            f"mapped in a person's logon session, so the worker would find no share. Use the UNC path instead: "
            f"--share {unc}" + ("" if target else "  (`net use` shows what the drive is mapped to)"))


def unc_form(share: str) -> str:
    """``\\\\?\\UNC\\server\\share\\x`` and ``//server/share/x`` as the plain ``\\\\server\\share\\x``."""
    p = PureWindowsPath(share)
    if p.drive.upper().startswith("\\\\?\\UNC\\"):
        return "\\\\" + str(p)[8:]
    return str(p)


def service_options(share: str, worker_id: str, config: str | None) -> dict[str, str]:
    """What install stores under the service's Parameters key; the service reads it back at start."""
    opts = {"share": unc_form(share), "id": worker_id}
    if config:
        opts["config"] = config
    return opts


def service_flags(options: Mapping[str, Any]) -> dict[str, Any]:
    """The stored options as ``spooler.config.resolve`` flags: they win over loraspool.toml, like the unit's
    ``--share``/``--id`` on Linux."""
    return {k: options.get(k) or None for k in OPTIONS}


def service_environment(venv: PureWindowsPath, repo: PureWindowsPath | None, system_path: str) -> list[str]:
    """The service's environment block (REG_MULTI_SZ ``Environment``): the venv's packages for the embedded
    Python of pythonservice.exe, pywin32's DLLs on PATH, and the machine's PATH after them."""
    site = venv / "Lib" / "site-packages"
    python_path = [str(p) for p in (repo, site) if p is not None]
    path = [str(site / "pywin32_system32"), str(site / "win32"), str(venv / "Scripts")]
    return [f"PYTHONPATH={';'.join(python_path)}", f"PATH={';'.join([*path, system_path])}",
            "PYTHONUNBUFFERED=1"]


def account(user: str | None) -> str | None:
    """The account name for CreateService: None is LocalSystem; a bare name means a local account (.\\name)."""
    if not user:
        return None
    if "\\" in user or "@" in user:
        return user
    return f".\\{user}"


def failure_actions(restart_after_s: int = 60) -> dict[str, Any]:
    """Restart a minute after every failure, like the systemd unit's Restart=on-failure. Three actions are
    listed because services.msc shows three, but the service controller repeats the last one for every later
    failure, so a file server that is down for a while at boot is waited out, never given up on.
    (SC_ACTION_RESTART = 1.) Passed to ChangeServiceConfig2(SERVICE_CONFIG_FAILURE_ACTIONS)."""
    ms = restart_after_s * 1000
    return {"ResetPeriod": 86400, "RebootMsg": "", "Command": "", "Actions": [(1, ms), (1, ms), (1, ms)]}


def default_log_file(program_data: str) -> Path:
    """A service has no console: without log_file in loraspool.toml, it logs here."""
    return Path(program_data, "loraspool", "logs", "worker.log")


class ServiceRunner:
    """What the service does between start and stop, with no win32 in it: resolve the settings, open the
    share, run a Worker until ``stop``. A stop is ``Worker.request_stop``, the same graceful stop as SIGTERM:
    the child checkpoints, the job goes back to the queue, the final heartbeat says so."""

    def __init__(self, flags: Mapping[str, Any], make_worker: Callable[..., Any] | None = None,
                 default_log: Path | None = None) -> None:
        self.flags = dict(flags)
        self.make_worker = make_worker
        self.default_log = default_log
        self.worker: Any = None
        self._lock = threading.Lock()
        self._stop_why: str | None = None

    def run(self) -> int:
        from spooler.config import ConfigError, resolve
        from spooler.logs import setup_logging
        from spooler.share import Share, ShareError

        try:
            cfg, _ = resolve(self.flags)
        except ConfigError as e:  # a service has no console: the default log file is the only place to say it
            setup_logging(False, self.default_log)
            log.error("loraspool service cannot start: %s", e)
            return 2
        setup_logging(False, cfg.log_file or self.default_log, cfg.log_max_bytes, cfg.log_backups)
        try:
            share = Share.open(cfg.share)
        except (ShareError, OSError) as e:
            log.error("loraspool service cannot open the share %s: %s (is it a UNC path the service account "
                      "can read? see deploy/README.md)", cfg.share, e)
            return 2
        return self._work(share, cfg)

    def _work(self, share: Any, cfg: Any) -> int:
        from worker.daemon import WorkerError
        from worker.slots import Slots

        try:
            with self._lock:
                self.worker = (self.make_worker or Slots)(share, cfg)
                if self._stop_why is not None:  # the stop came while the worker was being built
                    self.worker.request_stop(self._stop_why)
            return self.worker.work()
        except WorkerError as e:
            log.error("worker %s cannot start: %s", cfg.id, e)
            return 2

    def stop(self, why: str = "service stop") -> None:
        with self._lock:
            self._stop_why = why
            if self.worker is not None:
                self.worker.request_stop(why)
