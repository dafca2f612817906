"""A real SMB share seen from two "machines": Debian's smbd on 127.0.0.1 and two ``rclone mount``s of it.

Why: the spool claims jobs by renaming files on a shared network drive. A local temp folder cannot show what
an SMB client does (no cross-client inotify or flock, files invisible to others until closed, non-atomic
replace, ...), so the tests that matter run against a real smbd through two independent SMB clients. Each
rclone process is its own SMB session with its own caches, as two machines mounting one share are.

``smb_unavailable_reason()`` says why it cannot run here (for skips); ``with smb_pair(tmp) as pair:`` gives
``pair.backing`` (the folder smbd serves), ``pair.a`` and ``pair.b`` (the two mount points), and tears it
all down on exit. A mount whose rclone dies is remounted, as a client reconnects, and noted in
``pair.incidents``. See tests/SMB_FINDINGS.md for what was measured through it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

INSTALL_HINT = (
    "run .ci/run (deploy/setup.sh --test installs them as root), or: apt-get install -y samba rclone fuse3"
)

# Options that bring rclone's VFS closest to a kernel SMB client with caching off: no directory or attribute
# caching, and writes uploaded on close ("writes" holds uploads back for --vfs-write-back, 5 s, and "full"
# serves stale cached bytes). The SMB backend cannot poll for changes. Still not POSIX: see SMB_FINDINGS.md.
RCLONE_MOUNT_OPTIONS = ("--vfs-cache-mode", "minimal", "--dir-cache-time", "0s", "--attr-timeout", "0s")
RCLONE_MOUNT_OPTIONS += ("--poll-interval", "0")
# Even in "minimal" mode a file opened read-write (safetensors writes that way) goes through the cache and waits
# --vfs-write-back before it is uploaded; a kernel client flushes on close, so 0 s here.
RCLONE_MOUNT_OPTIONS += ("--vfs-write-back", "0s")

START_TIMEOUT = 30.0
_REMOTE = "LORASPOOLSMB"  # rclone remote name, configured through RCLONE_CONFIG_<NAME>_* variables only
_PASSWORD = "loraspool-test"
_DROPPED = (errno.ENOTCONN, errno.ECONNABORTED)  # what a FUSE mount whose rclone died answers
T = TypeVar("T")


@dataclass(frozen=True)
class SmbPair:
    """The served folder and two independent SMB client mounts of it."""

    backing: Path
    a: Path
    b: Path
    logs: Path
    incidents: list[str] = field(default_factory=list)  # mounts that died and were remounted, in order
    mounts: dict[str, _Mount] = field(default_factory=dict)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join([*self.incidents, *(_tail(p, lines) for p in sorted(self.logs.glob("*.log")))])

    def kill_mount(self, side: str, down_for: float = 0.0) -> None:
        """kill -9 one side's rclone, as a dropped SMB session; returns once it is remounted. For ``down_for``
        seconds the dead mount answers ENOTCONN, as a share whose server is away does."""
        seen, mount = len(self.incidents), self.mounts[side]
        assert mount.proc is not None and mount.proc.poll() is None, f"mount {side} is not running"
        mount.killed_on_purpose, mount.down_until = True, time.monotonic() + down_for
        os.killpg(mount.proc.pid, signal.SIGKILL)
        end = time.monotonic() + down_for + START_TIMEOUT + 5
        while len(self.incidents) == seen and time.monotonic() < end:
            time.sleep(0.05)
        assert len(self.incidents) > seen and self.incidents[-1].endswith("remounted"), self.incidents


    def retried(self, step: Callable[[], T]) -> T:
        """Run one of the test's own steps through a mount, and again if a remount explains its failure.

        Why: the workers under test ride out a dropped mount (they retry), but the test's own copy into an
        inbox, or its glob of the heartbeats, fails with ENOTCONN (or finds the bare mount point) in the second
        before the rig remounts, and would fail a test over rclone's panic rather than over the spool. An error
        that no remount explains is raised at once; so is one that outlasts a remount's timeout.
        """
        end = time.monotonic() + START_TIMEOUT + 5
        while True:
            seen = len(self.incidents)
            try:
                return step()
            except OSError as e:
                remounting = e.errno in _DROPPED or len(self.incidents) != seen or not self._up()
                if not remounting or time.monotonic() > end:
                    raise
            while not self._up() and time.monotonic() < end:
                time.sleep(0.05)

    def _up(self) -> bool:
        return all(m.proc is not None and m.proc.poll() is None and _mounted(m.mnt) for m in self.mounts.values())


def _tool(name: str) -> str | None:
    # smbd and smbpasswd live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


@functools.cache
def smb_unavailable_reason() -> str | None:
    """Why the SMB tests cannot run here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "the SMB tests need Linux (smbd + FUSE)"
    if os.geteuid() != 0:
        return "the SMB tests need root (smbd switches users; run them in the CI container)"
    for tool, pkg in (("smbd", "samba"), ("smbpasswd", "samba-common-bin"), ("rclone", "rclone")):
        if _tool(tool) is None:
            return f"{tool} not installed (package {pkg}): {INSTALL_HINT}"
    if _tool("fusermount3") is None and _tool("fusermount") is None:
        return f"fusermount3 not installed (package fuse3): {INSTALL_HINT}"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (run the container with --device /dev/fuse --cap-add SYS_ADMIN)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    probe = subprocess.run(
        [_tool("rclone") or "rclone", "help", "backend", "smb"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return "this rclone has no SMB backend (needs rclone >= 1.60)"
    return None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as e:
        return f"--- {path.name}: unreadable ({e})"
    return f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _end_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """End a process started with start_new_session=True and everything in its process group (smbd forks)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        if proc.poll() is not None and not _group_alive(proc.pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.05)
    proc.poll()


def _smb_conf(run: Path, backing: Path, log: Path, port: int, user: str) -> str:
    # Every path smbd writes to is private, so runs never touch /var/lib/samba or each other. No netbios,
    # no printing, no usershares: only the one share, only on loopback.
    return f"""[global]
  server role = standalone server
  workgroup = WORKGROUP
  smb ports = {port}
  interfaces = 127.0.0.1
  bind interfaces only = yes
  disable netbios = yes
  lock directory = {run}/lock
  state directory = {run}/state
  cache directory = {run}/cache
  pid directory = {run}/pid
  private dir = {run}/private
  ncalrpc dir = {run}/ncalrpc
  binddns dir = {run}/bind-dns
  passdb backend = tdbsam:{run}/private/passdb.tdb
  log file = {log}
  log level = 1
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes
  usershare max shares = 0
  idmap config * : backend = tdb
  idmap config * : range = 3000-7999
  server min protocol = SMB2_10

[spool]
  path = {backing}
  read only = no
  valid users = {user}
  force user = {user}
"""


@contextlib.contextmanager
def _smbd(run: Path, backing: Path, logs: Path, user: str) -> Iterator[int]:
    """Run smbd in the foreground on a free loopback port; yield the port."""
    smbd, smbpasswd = _tool("smbd"), _tool("smbpasswd")
    assert smbd and smbpasswd, smb_unavailable_reason()
    for sub in ("lock", "state", "cache", "pid", "private", "ncalrpc", "bind-dns"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    log = logs / "smbd.log"
    last_error = ""
    for _attempt in range(3):  # the free port can be taken between choosing and binding it
        port = _free_port()
        conf = run / "smb.conf"
        conf.write_text(_smb_conf(run, backing, log, port, user))
        added = subprocess.run(
            [smbpasswd, "-c", str(conf), "-s", "-a", user],
            input=f"{_PASSWORD}\n{_PASSWORD}\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        if added.returncode != 0:
            raise RuntimeError(f"smbpasswd -a {user} failed: {added.stdout}{added.stderr}")
        out = open(logs / "smbd.stdout.log", "ab")  # noqa: SIM115 - closed below
        # smbd --foreground exits when its stdin reaches EOF: it gets a pipe that stays open until teardown.
        proc = subprocess.Popen(
            [smbd, "--foreground", "--no-process-group", "--debug-stdout", "-s", str(conf)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            end = time.monotonic() + START_TIMEOUT
            while proc.poll() is None and not _listening(port) and time.monotonic() < end:
                time.sleep(0.05)
            if proc.poll() is None and _listening(port):
                yield port
                return
            last_error = (
                f"smbd {'exited with ' + str(proc.returncode) if proc.poll() is not None else 'timed out'}"
                f" before listening on 127.0.0.1:{port}\n{_tail(logs / 'smbd.stdout.log')}\n{_tail(log)}"
            )
        finally:
            if proc.stdin:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            end = time.monotonic() + 5
            while proc.poll() is None and time.monotonic() < end:
                time.sleep(0.05)
            _end_group(proc)
            out.close()
    raise RuntimeError(last_error)


def _mounted(mnt: Path) -> bool:
    """Whether mnt is a mount point, from /proc/mounts (os.path.ismount says False for a dead FUSE mount)."""
    with open("/proc/mounts") as f:
        points = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[1]) for line in f}
    return str(mnt) in points


def _unmount(mnt: Path) -> None:
    fusermount = _tool("fusermount3") or _tool("fusermount") or "fusermount"
    for args in (["-u"], ["-uz"]):
        if not _mounted(mnt):
            return
        subprocess.run([fusermount, *args, str(mnt)], capture_output=True, timeout=30)


class _Mount:
    """One ``rclone mount`` process, remounted by ``revive()`` when it has died.

    Why revive: Debian 12's rclone 1.60.1 can panic in its SMB backend when a stat fails right after an upload
    (rclone issue #8106, fixed in 1.69) and its mount then answers ENOTCONN. A kernel SMB client reconnects
    after a dropped session, so the rig does the same, and keeps a line saying so in ``SmbPair.incidents``.
    (rclone from PyPI, 1.75, was tried: it busy-loops two cores and breaks the findings in SMB_FINDINGS.md.)
    """

    def __init__(self, name: str, mnt: Path, env: dict[str, str], run: Path, logs: Path) -> None:
        self.name, self.mnt, self.env, self.log = name, mnt, env, logs / f"rclone-{name}.log"
        self.cmd = [
            _tool("rclone") or "rclone",
            "mount",
            f"{_REMOTE}:spool",
            str(mnt),
            *RCLONE_MOUNT_OPTIONS,
            "--cache-dir",
            str(run / f"rclone-cache-{name}"),
            "--log-file",
            str(self.log),
            "-v",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed_on_purpose = False
        self.down_until = 0.0  # a mount killed on purpose stays dead until then (our monotonic clock)
        self.gave_up = False  # a remount failed: the tests see ENOTCONN from here on, and the incident says why

    def start(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        end = time.monotonic() + START_TIMEOUT
        while self.proc.poll() is None and not _mounted(self.mnt) and time.monotonic() < end:
            time.sleep(0.05)
        if not _mounted(self.mnt):
            state = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "timed out"
            raise RuntimeError(f"rclone mount {self.name} {state} before {self.mnt} was mounted\n{_tail(self.log)}")

    def revive(self) -> str | None:
        """Remount if rclone has exited; return what happened to it, or None when it is alive."""
        if self.proc is None or self.proc.poll() is None or self.gave_up or time.monotonic() < self.down_until:
            return None
        if self.killed_on_purpose:
            died, self.killed_on_purpose = f"rclone mount {self.name} killed on purpose", False
        else:
            died = f"rclone mount {self.name} exited with {self.proc.returncode}: {_first_panic(self.log)}"
        _unmount(self.mnt)  # the dead FUSE mount still answers ENOTCONN until it is detached
        if _mounted(self.mnt):  # start() would take the dead mount for a live one
            raise RuntimeError(f"{died}; its dead mount {self.mnt} could not be detached")
        self.start()
        return f"{died}; remounted"

    def stop(self) -> None:
        _unmount(self.mnt)  # rclone exits by itself once its mount is gone
        if self.proc is not None:
            end = time.monotonic() + 10
            while self.proc.poll() is None and time.monotonic() < end:
                time.sleep(0.05)
            _end_group(self.proc)  # SIGTERM makes rclone unmount and exit if the unmount above could not
        _unmount(self.mnt)


def _first_panic(log: Path) -> str:
    """The panic line and the frame that names where rclone crashed, for the incident report."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"log unreadable ({e})"
    for i, line in enumerate(lines):
        if line.startswith("panic:"):
            frame = next((x.strip() for x in lines[i + 1:i + 8] if x.startswith("github.com/")), "")
            return f"{line} at {frame}" if frame else line
    return "no panic in its log"


@contextlib.contextmanager
def _supervised(mounts: list[_Mount], incidents: list[str]) -> Iterator[None]:
    """Start the mounts, and revive any that dies while the tests run (checked every 0.2 s)."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            for m in mounts:
                try:
                    what = m.revive()
                except RuntimeError as e:
                    m.gave_up = True
                    what = f"rclone mount {m.name} died and could not be remounted: {e}"
                if what:
                    incidents.append(what)

    started: list[_Mount] = []
    watcher = threading.Thread(target=watch, name="smb-mounts", daemon=True)
    try:
        for m in mounts:
            started.append(m)
            m.start()
        watcher.start()
        yield
    finally:
        done.set()
        if watcher.is_alive():
            watcher.join()  # a remount under way ends within its own timeouts; stop() must not race it
        for m in started:
            m.stop()


def _wait_cross_visible(pair: SmbPair) -> None:
    """Both mounts are live when bytes written through a read back through b (and b can delete them).

    The probe goes in a subfolder: rclone 1.60's SMB backend, writing a file at the very root of the remote,
    also creates a stray directory named "\uff0e" (an encoded ".") there.
    """
    probe, data = f".smbshare-probe-{uuid.uuid4().hex}", uuid.uuid4().bytes
    end = time.monotonic() + START_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            (pair.a / probe).mkdir(exist_ok=True)
            (pair.a / probe / "probe").write_bytes(data)
            if (pair.b / probe / "probe").read_bytes() == data:
                (pair.b / probe / "probe").unlink()
                (pair.b / probe).rmdir()
                return
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(
        f"a file written through {pair.a} never showed through {pair.b} ({last})\n{pair.log_tail()}"
    )


@contextlib.contextmanager
def smb_pair(tmp_path: Path) -> Iterator[SmbPair]:
    """Serve ``tmp_path/share`` over SMB on 127.0.0.1 and mount it twice (``tmp_path/a``, ``tmp_path/b``).

    smbd's sockets and databases go in a short /tmp folder, not tmp_path: Samba's messaging uses AF_UNIX
    sockets whose paths (108 bytes at most) a deep pytest tmp_path can overflow. Logs go in ``tmp_path/logs``.
    """
    reason = smb_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    backing, logs = tmp_path / "share", tmp_path / "logs"
    backing.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    user = pwd.getpwuid(os.geteuid()).pw_name
    run = Path(tempfile.mkdtemp(prefix="lsmb-"))
    pair = SmbPair(backing=backing, a=tmp_path / "a", b=tmp_path / "b", logs=logs)
    try:
        with _smbd(run, backing, logs, user) as port:
            rclone_conf = run / "rclone.conf"
            rclone_conf.touch()  # an empty config: the remote is defined by environment variables alone
            obscured = subprocess.run(
                [_tool("rclone") or "rclone", "obscure", _PASSWORD],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.strip()
            key = f"RCLONE_CONFIG_{_REMOTE}_"
            env = {
                **os.environ,
                "RCLONE_CONFIG": str(rclone_conf),
                f"{key}TYPE": "smb",
                f"{key}HOST": "127.0.0.1",
                f"{key}PORT": str(port),
                f"{key}USER": user,
                f"{key}PASS": obscured,
            }
            for side, mnt in (("a", pair.a), ("b", pair.b)):
                pair.mounts[side] = _Mount(side, mnt, env, run, logs)
            with _supervised(list(pair.mounts.values()), pair.incidents):
                _wait_cross_visible(pair)
                yield pair
    finally:
        shutil.rmtree(run, ignore_errors=True)


@contextlib.contextmanager
def incidents_warned(pair: SmbPair) -> Iterator[None]:
    """Warn (pytest lists it in the summary) of every mount that died by itself and was remounted in the block."""
    seen = len(pair.incidents)
    yield
    for line in pair.incidents[seen:]:
        if "on purpose" not in line:
            warnings.warn(f"SMB rig: {line}", stacklevel=1)
