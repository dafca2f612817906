"""The Windows service: pywin32's service framework around ``ServiceRunner``. Windows only, and thin.

Every decision (UNC checks, the service's options and environment, what a stop does) lives in
``spooler.service_windows``, where CI tests it; this module only makes the win32 calls. It has never run in CI.
"""

from __future__ import annotations

import getpass
import os
import sys
import threading
from pathlib import Path, PureWindowsPath

from spooler import service_windows as sw

if sys.platform != "win32":  # pragma: no cover - imported only on Windows
    raise ImportError("worker.winservice is for Windows; on Linux use `loraspool service install` (systemd)")

import servicemanager  # noqa: E402 - pywin32, Windows only
import win32api  # noqa: E402
import win32con  # noqa: E402
import win32file  # noqa: E402
import win32service  # noqa: E402
import win32serviceutil  # noqa: E402
import win32wnet  # noqa: E402


def mapped_drive(drive: str) -> str | None:
    """What ``drive`` ("Z:") is mapped to in this logon session; "" if remote but unknown; None if local."""
    if win32file.GetDriveType(drive + "\\") != win32file.DRIVE_REMOTE:
        return None
    try:
        return win32wnet.WNetGetConnection(drive)
    except win32wnet.error:
        return ""


class LoraspoolService(win32serviceutil.ServiceFramework):
    _svc_name_ = sw.SERVICE_NAME
    _svc_display_name_ = sw.DISPLAY_NAME
    _svc_description_ = sw.DESCRIPTION

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        options = {k: win32serviceutil.GetServiceCustomOption(self._svc_name_, k) for k in sw.OPTIONS}
        program_data = os.environ.get("PROGRAMDATA", r"C:\ProgramData")
        self.runner = sw.ServiceRunner(sw.service_flags(options), default_log=sw.default_log_file(program_data))
        self.stopped = threading.Event()

    def SvcDoRun(self) -> None:  # noqa: N802 - pywin32's name
        servicemanager.LogMsg(servicemanager.EVENTLOG_INFORMATION_TYPE, servicemanager.PYS_SERVICE_STARTED,
                              (self._svc_name_, ""))
        try:
            code = self.runner.run()
        finally:
            self.stopped.set()
        if code:
            # Raising makes pywin32 report SERVICE_STOPPED with an error, which the SCM's failure actions
            # (set at install) answer with a restart, like Restart=on-failure.
            raise RuntimeError(f"{self._svc_name_} stopped with exit code {code}; see its log file")

    def SvcStop(self) -> None:  # noqa: N802
        self._stop("service stop")

    def SvcShutdown(self) -> None:  # noqa: N802 - the machine is shutting down; Windows waits only seconds
        self._stop("system shutdown")

    def _stop(self, why: str) -> None:
        """Return at once (the SCM wants its control handler back), and keep reporting "stop pending" while
        the training child writes its checkpoint, so the SCM keeps waiting."""
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=sw.STOP_WAIT_HINT_MS)
        self.runner.stop(why)
        threading.Thread(target=self._still_stopping, daemon=True).start()

    def _still_stopping(self) -> None:
        while not self.stopped.wait(sw.STOP_WAIT_HINT_MS / 3000):
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=sw.STOP_WAIT_HINT_MS)


# ── install, start, stop, remove: what `loraspool service ...` calls on Windows ────────────────────────
def install(share: str, worker_id: str, config: str | None, user: str | None, password: str | None) -> str:
    if problem := sw.unc_problem(share, mapped_drive):
        raise SystemExit(f"loraspool service install: {problem}")
    if user and password is None:
        password = getpass.getpass(f"password for {user} (the service runs as this account): ")
    venv = PureWindowsPath(sys.prefix)
    repo = PureWindowsPath(Path(__file__).resolve().parents[1])
    win32serviceutil.InstallService(sw.CLASS_STRING, sw.SERVICE_NAME, sw.DISPLAY_NAME,
                                    startType=win32service.SERVICE_AUTO_START, userName=sw.account(user),
                                    password=password, description=sw.DESCRIPTION, delayedstart=True)
    for key, value in sw.service_options(share, worker_id, config).items():
        win32serviceutil.SetServiceCustomOption(sw.SERVICE_NAME, key, value)
    _set_environment(sw.service_environment(venv, repo, os.environ.get("PATH", "")))
    _set_failure_actions()
    return f"installed service {sw.SERVICE_NAME} for share {sw.unc_form(share)} as worker {worker_id}"


def _set_environment(block: list[str]) -> None:
    key = win32api.RegOpenKeyEx(win32con.HKEY_LOCAL_MACHINE,
                                rf"SYSTEM\CurrentControlSet\Services\{sw.SERVICE_NAME}", 0, win32con.KEY_SET_VALUE)
    try:
        win32api.RegSetValueEx(key, "Environment", 0, win32con.REG_MULTI_SZ, block)
    finally:
        win32api.RegCloseKey(key)


def _set_failure_actions() -> None:
    scm = win32service.OpenSCManager(None, None, win32service.SC_MANAGER_ALL_ACCESS)
    try:
        svc = win32service.OpenService(scm, sw.SERVICE_NAME, win32service.SERVICE_ALL_ACCESS)
        try:
            win32service.ChangeServiceConfig2(svc, win32service.SERVICE_CONFIG_FAILURE_ACTIONS, sw.failure_actions())
            win32service.ChangeServiceConfig2(svc, win32service.SERVICE_CONFIG_FAILURE_ACTIONS_FLAG, True)
        finally:
            win32service.CloseServiceHandle(svc)
    finally:
        win32service.CloseServiceHandle(scm)


def start() -> str:
    win32serviceutil.StartService(sw.SERVICE_NAME)
    return f"started {sw.SERVICE_NAME}"


def stop() -> str:
    win32serviceutil.StopService(sw.SERVICE_NAME)
    return f"asked {sw.SERVICE_NAME} to stop: it finishes the training step, checkpoints, then stops"


def remove() -> str:
    win32serviceutil.RemoveService(sw.SERVICE_NAME)
    return f"removed {sw.SERVICE_NAME}"


def status() -> str:
    code = win32serviceutil.QueryServiceStatus(sw.SERVICE_NAME)[1]
    return f"{sw.SERVICE_NAME}: {sw.STATES.get(code, code)}"


if __name__ == "__main__":  # pythonservice.exe, or `python -m worker.winservice debug`
    win32serviceutil.HandleCommandLine(LoraspoolService)
