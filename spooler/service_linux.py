"""The worker as a systemd service: render the unit, write it, enable it, remove it.

The unit is rendered here from one template, and ``deploy/linux/loraspool-worker.service`` is that template
rendered with example values (a test keeps them equal), so the example and what ``loraspool service install``
writes cannot drift apart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

UNIT_NAME = "loraspool-worker.service"
UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_CACHE = Path("/var/cache/loraspool")  # what CacheDirectory=loraspool gives the service
MARK = "# Written by `loraspool service install`"

TEMPLATE = """\
{mark}; `loraspool service uninstall` removes it.
# systemd unit for the loraspool worker on a Linux GPU desktop. See deploy/README.md.
[Unit]
Description=loraspool LoRA training worker {worker_id}
Documentation={docs}
Wants=network-online.target
After=network-online.target remote-fs.target
# The share must be mounted before the worker looks at it; this also orders the unit after the mount.
RequiresMountsFor={share}
# Give up after 5 failed starts in 10 minutes (a share that never comes back), rather than loop forever.
StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
Type=simple
User={user}
Group={group}
Environment=PYTHONUNBUFFERED=1
# training.compile's kernel caches: the service's home is read-only here (ProtectSystem=strict), and a cache that
# outlives a restart saves the next compile minutes.
Environment=TRITON_CACHE_DIR=/var/cache/loraspool/triton TORCHINDUCTOR_CACHE_DIR=/var/cache/loraspool/inductor
{environment}ExecStart={exec_start}
Restart=on-failure
RestartSec=10
# SIGTERM asks the worker to stop at the training step it is in: the child checkpoints, the job goes back to
# the queue, the last heartbeat says so. Only the daemon gets it (KillMode=mixed); it stops its child itself.
KillSignal=SIGTERM
KillMode=mixed
# Long enough to write a checkpoint of an 8B model's LoRA state to the share; then SIGKILL.
TimeoutStopSec={stop_timeout}
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=true
# No PrivateDevices=: the worker needs /dev/nvidia*.
CacheDirectory=loraspool
ReadWritePaths={read_write}

[Install]
WantedBy=multi-user.target
"""


@dataclass
class UnitSpec:
    share: Path
    worker_id: str
    user: str = "loraspool"
    group: str | None = None
    exe: list[str] = field(default_factory=lambda: default_exe())
    writable: list[Path] = field(default_factory=list)  # the cache and log folders, when not the defaults
    environment: dict[str, str] = field(default_factory=dict)  # settings given to install as flags
    config: Path | None = None
    stop_timeout: int = 300
    docs: str = field(default_factory=lambda: (Path(__file__).resolve().parents[1] / "deploy" / "README.md").as_uri())


class ServiceError(Exception):
    """Installing or removing the unit failed; the message says what to do."""


def default_exe() -> list[str]:
    """The venv's ``loraspool`` script beside this Python, or ``python -m spooler.cli`` when there is none."""
    script = Path(sys.executable).parent / "loraspool"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "spooler.cli"]


def quote(value: str) -> str:
    """A word for a unit file: % doubled (specifiers), and double quotes around anything with spaces."""
    value = value.replace("%", "%%")
    if not any(c.isspace() or c in "\"'\\;" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(spec: UnitSpec) -> str:
    args = [*spec.exe, "worker", "--share", str(spec.share), "--id", spec.worker_id]
    if spec.config is not None:
        args += ["--config", str(spec.config)]
    environment = "".join(f"Environment={quote(f'{k}={v}')}\n" for k, v in spec.environment.items())
    # The share must be there (RequiresMountsFor); install makes the others, and a missing one is no error.
    rw = [quote(str(spec.share))] + [quote(f"-{p}") for p in spec.writable]
    home = "read-only" if any(str(a).startswith(("/home/", "/root/")) for a in spec.exe) else "true"
    return TEMPLATE.format(mark=MARK, docs=quote(spec.docs), worker_id=spec.worker_id, share=quote(str(spec.share)),
                           user=spec.user, group=spec.group or spec.user, environment=environment,
                           exec_start=" ".join(quote(a) for a in args), stop_timeout=spec.stop_timeout,
                           protect_home=home, read_write=" ".join(rw))


def writable_paths(cache_dir: Path | None, log_file: Path | None) -> list[Path]:
    """Folders besides the share the worker writes: a cache other than CacheDirectory's, the log's folder."""
    paths = [cache_dir] if cache_dir is not None and cache_dir != DEFAULT_CACHE else []
    return paths + ([log_file.parent] if log_file is not None else [])


def make_writable(spec: UnitSpec) -> None:
    """Create the extra folders for the service's account: under ProtectSystem=strict it could not."""
    for folder in spec.writable:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(folder, spec.user, spec.group or spec.user)


def problems(spec: UnitSpec, check_user: bool = True) -> list[str]:
    """What would make the installed unit fail at boot, each with the fix."""
    out = []
    if not spec.share.is_absolute():
        out.append(f"--share {spec.share} is relative; give the mount point, like /mnt/share")
    elif not spec.share.is_dir():
        out.append(f"--share {spec.share} is not a folder here; mount the share first (deploy/README.md has "
                   "fstab lines)")
    if not Path(spec.exe[0]).is_file():
        out.append(f"{spec.exe[0]} does not exist; run `loraspool service install` from the venv that has loraspool")
    if check_user:
        import pwd  # POSIX only; this module is only imported on Linux

        try:
            pwd.getpwnam(spec.user)
        except KeyError:
            out.append(f"user {spec.user!r} does not exist; create it: useradd --system --create-home "
                       f"--home-dir /var/lib/loraspool --shell /usr/sbin/nologin {spec.user}")
    return out


def write_unit(text: str, unit_dir: Path = UNIT_DIR) -> Path:
    """Write the unit atomically (temp file, then rename), so systemd never reads half a unit."""
    target = unit_dir / UNIT_NAME
    if target.exists() and MARK not in target.read_text(errors="replace"):
        raise ServiceError(f"{target} exists and was not written by loraspool; move it away first")
    tmp = unit_dir / f".{UNIT_NAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except PermissionError as e:
        tmp.unlink(missing_ok=True)
        raise ServiceError(f"cannot write {target} ({e}); run it as root: sudo loraspool service install ...") from e
    return target


def remove_unit(unit_dir: Path = UNIT_DIR) -> Path | None:
    target = unit_dir / UNIT_NAME
    if not target.exists():
        return None
    if MARK not in target.read_text(errors="replace"):
        raise ServiceError(f"{target} was not written by loraspool; remove it by hand if it is yours")
    target.unlink()
    return target


def systemctl(*args: str) -> tuple[int, str]:
    """Run systemctl; (127, why) when there is none (a container, a machine without systemd)."""
    if shutil.which("systemctl") is None:
        return 127, "systemctl not found"
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def verify(unit: Path) -> tuple[int, str] | None:
    """``systemd-analyze verify`` on the unit; None when systemd-analyze is not installed."""
    if shutil.which("systemd-analyze") is None:
        return None
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def example() -> str:
    """deploy/linux/loraspool-worker.service: the unit as install writes it, for a venv in /opt/loraspool."""
    return render(UnitSpec(share=Path("/mnt/share"), worker_id="gpu-desk", exe=["/opt/loraspool/.venv/bin/loraspool"],
                           docs="file:///opt/loraspool/deploy/README.md"))
