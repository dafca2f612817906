"""``loraspool doctor``: check a machine and its share before anyone waits on a job there.

Each check is a named result, ok, warn or fail, with what to do. A fail means a worker here would not work;
a warn means it works, with a cost or a caveat. What the share really does (rename, locks, change
notification, file times) is measured in a scratch folder of our own under ``SHARE/tmp/``, which is removed
afterwards; nothing else on the share is touched.

Torch and bitsandbytes are probed in a child process: ``spooler`` never imports torch, and a broken CUDA
install that crashes on import must give a line in the report, not a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from spooler.share import SETTINGS_FILE

Status = Literal["ok", "warn", "fail"]
GB = 1024**3
LOW_SHARE_GB = 10  # adapters and checkpoints are small; datasets and models are not
LOW_CACHE_GB = 20  # one 8 GB base, plus the previous copy kept while a job may read it
CLOCK_WARN_S = 2.0
WATCH_WAIT_S = 3.0
PROBE = r"""
import json, sys
out = {}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda_build"] = torch.version.cuda
    out["cuda"] = torch.cuda.is_available()
    out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if out["cuda"] else []
    out["bf16"] = bool(out["cuda"] and torch.cuda.is_bf16_supported(including_emulation=False))
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
try:
    import bitsandbytes
    out["bitsandbytes"] = bitsandbytes.__version__
except Exception as e:
    out["bitsandbytes_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def run_checks(share: Path | None, cache_dir: Path | None, *, packages: bool = True,
               config_problem: str | None = None) -> list[Check]:
    checks: list[Check] = []
    if config_problem is not None:
        checks.append(Check("settings", "fail", config_problem, "fix loraspool.toml, the flags or LORASPOOL_*"))
    if share is None:
        checks.append(Check("share reachable", "fail", "no share given",
                            "pass --share PATH, set LORASPOOL_SHARE, or set share in loraspool.toml"))
    else:
        checks += share_checks(Path(share))
    if cache_dir is not None:
        checks.append(free_disk("cache free space", Path(cache_dir), LOW_CACHE_GB, "the model cache"))
    if packages:
        checks += package_checks()
        checks += gpu_memory()
    return checks


# ── the share ───────────────────────────────────────────────────────────────────────────────────────
def share_checks(root: Path) -> list[Check]:
    if (problem := windows_share_problem(root)) is not None:
        return [Check("share path", "fail", problem, "reinstall the service with the UNC path")]
    if not root.is_dir():
        return [Check("share reachable", "fail", f"{root} is not a folder here",
                      "mount the share (deploy/README.md has fstab lines) or fix the path")]
    checks = [reachable(root)]
    try:
        with scratch(root) as tmp:
            checks.append(Check("share writable", "ok", f"wrote, read back and removed a file in {tmp.parent}"))
            checks += [rename_atomic(tmp), locks(tmp), watching(root, tmp), clock_offset(tmp)]
    except OSError as e:
        checks.append(Check("share writable", "fail", f"cannot write in {root}: {type(e).__name__}: {e}",
                            "give this machine's account (the service account) write access to the share"))
    checks.append(free_disk("share free space", root, LOW_SHARE_GB, "the share"))
    return checks


def windows_share_problem(root: Path) -> str | None:
    if sys.platform != "win32":
        return None
    from spooler.service_windows import unc_problem
    from worker.winservice import mapped_drive

    return unc_problem(str(root), mapped_drive)


def reachable(root: Path) -> Check:
    from spooler.watch import filesystem_type

    fstype = filesystem_type(root) or "unknown filesystem"
    if not (root / SETTINGS_FILE).is_file():
        return Check("share reachable", "fail", f"{root} ({fstype}) has no {SETTINGS_FILE}",
                     f"if the share is a network drive, mount it first (this folder is on {fstype}); to make "
                     f"a new share here: loraspool init {root}")
    return Check("share reachable", "ok", f"{root} ({fstype})")


@contextlib.contextmanager
def scratch(root: Path) -> Iterator[Path]:
    """A folder of our own on the share, with one file written and read back; removed afterwards."""
    base = root / "tmp" if (root / "tmp").is_dir() else root
    tmp = base / f".doctor-{socket.gethostname().split('.')[0]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        probe = tmp / "probe"
        probe.write_bytes(b"loraspool doctor\n")
        if probe.read_bytes() != b"loraspool doctor\n":
            raise OSError("a file written to the share read back different")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only our own scratch folder


def rename_atomic(tmp: Path) -> Check:
    """A claim is a rename: after renaming onto a new name and onto an existing one, exactly one name is left,
    holding the new bytes."""
    a, b, c = tmp / "a", tmp / "b", tmp / "c"
    a.write_bytes(b"new")
    b.write_bytes(b"old")
    try:
        os.rename(a, c)
        first = sorted(p.name for p in (a, c) if p.exists())
        c.replace(b)
        left = sorted(n for n in os.listdir(tmp) if n in ("a", "b", "c"))
        data = b.read_bytes() if b.exists() else b""
    except OSError as e:
        return Check("rename", "fail", f"rename failed: {type(e).__name__}: {e}",
                     "the spool claims jobs by rename: use a filesystem or mount that supports it")
    if first == ["c"] and left == ["b"] and data == b"new":
        return Check("rename", "ok", "a rename leaves exactly one name, with the new bytes")
    return Check("rename", "fail", f"after renames the names left were {first} then {left}, holding {data!r}",
                 "mount the share with a client that renames properly (kernel CIFS/NFS; see deploy/README.md)")


def locks(tmp: Path) -> Check:
    """Whether a second process is kept out of a filelock. The spool never relies on it (claims are renames),
    so a share that ignores locks is a warning, not a failure."""
    from filelock import FileLock, Timeout

    path = str(tmp / "lock")
    code = ("import sys, filelock\n"
            "try:\n    filelock.FileLock(sys.argv[1]).acquire(timeout=0); print('got')\n"
            "except filelock.Timeout:\n    print('excluded')\n")
    try:
        with FileLock(path).acquire(timeout=5):
            out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60)
    except (Timeout, OSError) as e:
        return Check("locks", "warn", f"cannot take a lock on the share ({type(e).__name__}: {e})",
                     "nothing to do: the spool does not use locks on the share")
    answer = out.stdout.strip()
    if answer == "excluded":
        return Check("locks", "ok", "a second process is kept out (the spool does not rely on it)")
    if answer == "got":
        return Check("locks", "warn", "a second process got the same lock: locks are not enforced here",
                     "nothing to do: the spool claims by rename, never by lock (mounts with nobrl do this)")
    return Check("locks", "warn", f"the lock probe failed: {out.stderr.strip()[-300:]}", "")


def watching(root: Path, tmp: Path) -> Check:
    """Whether change notification sees a file another process writes. On a network filesystem inotify
    never sees another machine's files, so the worker polls there whatever this says."""
    from spooler.watch import choose_mode, filesystem_type

    if choose_mode(root, "auto") == "polling":
        return Check("change notification", "ok",
                     f"{filesystem_type(root) or 'network share'}: the worker polls (inotify never sees other "
                     "machines' files), and rescans every rescan_interval")
    seen = native_sees_other_process(tmp)
    if seen:
        return Check("change notification", "ok", "native notification sees another process's new file")
    return Check("change notification", "warn", f"native notification saw no event in {WATCH_WAIT_S:g}s",
                 "start the worker with --watch polling (or watch = \"polling\" in loraspool.toml)")


def native_sees_other_process(folder: Path, wait: float = WATCH_WAIT_S) -> bool:
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    seen = threading.Event()

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: object) -> None:
            if "from-child" in str(getattr(event, "src_path", "")):
                seen.set()

    observer = Observer()
    observer.schedule(Handler(), str(folder), recursive=False)
    try:
        observer.start()
    except OSError:
        return False
    try:
        code = "import sys; open(sys.argv[1], 'w').write('x')"
        subprocess.run([sys.executable, "-c", code, str(folder / "from-child")], check=False, timeout=60)
        return seen.wait(wait)
    finally:
        observer.stop()
        observer.join(timeout=5)


def clock_offset(tmp: Path, now: Callable[[], float] = time.time) -> Check:
    """File times on the share against this machine's clock. Liveness never compares clocks, so an offset
    only mislabels times for people; large ones still deserve an NTP fix."""
    probe = tmp / "clock"
    before = now()
    probe.write_bytes(b"")
    after = now()
    offset = probe.stat().st_mtime - (before + after) / 2
    detail = f"file times on the share are {abs(offset):.1f}s {'ahead of' if offset > 0 else 'behind'} this clock"
    if abs(offset) <= CLOCK_WARN_S:
        return Check("clock offset", "ok", detail)
    return Check("clock offset", "warn", detail,
                 "sync both clocks with NTP (timedatectl set-ntp true; w32tm /resync on Windows); liveness does "
                 "not depend on it, but times shown to people will be off")


def free_disk(name: str, path: Path, low_gb: float, what: str) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the cache folder may not exist yet: its disk does
    try:
        usage = shutil.disk_usage(probe)
    except OSError as e:
        return Check(name, "warn", f"cannot measure {path}: {e}", "")
    free = usage.free / GB
    detail = f"{free:.1f} GB free at {path}"
    if free < 1:
        return Check(name, "fail", detail, f"free space on {what}")
    if free < low_gb:
        return Check(name, "warn", detail, f"free space on {what}: {low_gb} GB or more is comfortable")
    return Check(name, "ok", detail)


# ── this machine ────────────────────────────────────────────────────────────────────────────────────
def probe_packages(timeout: float = 180) -> dict:
    try:
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"torch_error": f"importing torch took over {timeout:g}s"}
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"torch_error": f"the probe crashed (exit {out.returncode}): {out.stderr.strip()[-300:]}"}


def package_checks(found: dict | None = None, gpu_count: int | None = None) -> list[Check]:
    found = probe_packages() if found is None else found
    gpus = nvml_gpus() if gpu_count is None else [{}] * gpu_count
    checks = [_torch_check(found, len(gpus))]
    if "bitsandbytes" in found:
        checks.append(Check("bitsandbytes", "ok", f"bitsandbytes {found['bitsandbytes']}"))
    else:
        checks.append(Check("bitsandbytes", "warn", f"not importable ({found.get('bitsandbytes_error', '?')})",
                            "only 4bit/8bit jobs need it: pip install bitsandbytes (CUDA machines)"))
    return checks


def _torch_check(found: dict, nvml_count: int) -> Check:
    if "torch" not in found:
        return Check("torch", "fail", f"not importable ({found.get('torch_error', '?')})",
                     "install it into the worker's venv: bash deploy/setup.sh")
    version = f"torch {found['torch']} (CUDA build {found.get('cuda_build') or 'none'})"
    if found.get("cuda"):
        names = ", ".join(found.get("gpus", []))
        return Check("torch", "ok", f"{version}; CUDA sees {names}; bf16 {'yes' if found.get('bf16') else 'no'}")
    if nvml_count:
        return Check("torch", "fail", f"{version}, but CUDA is not available although the driver shows "
                     f"{nvml_count} GPU(s)", "install a CUDA build of torch matching the driver (nvidia-smi)")
    return Check("torch", "warn", f"{version}; no GPU: jobs train on the CPU, slowly",
                 "fine for tests and small models; a GPU worker needs the NVIDIA driver")


def nvml_gpus() -> list[dict]:
    """``GpuInfo`` fields of each GPU via NVML; [] without a driver (not an error on a CPU machine)."""
    from worker.sysinfo import read_gpus  # psutil and pynvml only: the doctor stays torch-free

    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        return read_gpus(pynvml)
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def gpu_memory(gpus: list[dict] | None = None) -> list[Check]:
    gpus = nvml_gpus() if gpus is None else gpus
    if not gpus:
        return [Check("pynvml", "warn", "no NVIDIA driver or GPU visible through NVML",
                      "on a GPU machine: install the NVIDIA driver (nvidia-smi must work)")]
    checks = []
    for g in gpus:
        if g.get("memory_total_bytes") is None:
            checks.append(Check(f"gpu {g['index']} memory", "warn", f"GPU {g['index']} {g['name']}: NVML does not "
                                "report its memory", "check it with nvidia-smi"))
            continue
        free, total = g["memory_free_bytes"] / GB, g["memory_total_bytes"] / GB
        detail = f"GPU {g['index']} {g['name']}: {free:.1f} of {total:.1f} GB free"
        busy = free < 0.5 * total
        checks.append(Check(f"gpu {g['index']} memory", "warn" if busy else "ok", detail,
                            "another process holds GPU memory (nvidia-smi shows it); jobs may run out" if busy
                            else ""))
    return checks


# ── output ──────────────────────────────────────────────────────────────────────────────────────────
def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<5} {c.name:<{width}}  {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    fails = sum(c.status == "fail" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    lines.append(f"{fails} to fix, {warns} warning(s)" if fails or warns else "all good")
    return "\n".join(lines)


def as_json(checks: list[Check]) -> dict:
    return {"ok": not any(c.status == "fail" for c in checks), "checks": [asdict(c) for c in checks]}
