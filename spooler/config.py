"""Worker settings, merged in one place: flags over environment over ``loraspool.toml`` over defaults.

The share-wide settings (heartbeat interval, stale-after, ...) live on the share itself, so every worker and
submitter agrees on them; see ``schemas.settings``. These are the per-machine ones: a GPU desktop keeps them
in ``loraspool.toml`` (``/etc/loraspool/`` on Linux, ``%ProgramData%\\loraspool\\`` on Windows), so a service
starts with the same settings a person sees in ``loraspool config show``.

Every problem is collected before anything starts, each with the file, variable or flag it came from: a
service that fails at boot must say everything that is wrong in one log line, not one problem per restart.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import sys
from collections.abc import Mapping
from datetime import datetime, time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.job import id_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

ENV = {"share": "LORASPOOL_SHARE", "id": "LORASPOOL_WORKER_ID", "device": "LORASPOOL_DEVICE",
       "watch": "LORASPOOL_WATCH", "devices": "LORASPOOL_DEVICES",
       "max_concurrent_jobs": "LORASPOOL_MAX_CONCURRENT_JOBS", "allowed_model_roots": "LORASPOOL_ALLOWED_MODEL_ROOTS",
       "cache_dir": "LORASPOOL_CACHE_DIR", "cache_models": "LORASPOOL_CACHE_MODELS",
       "log_file": "LORASPOOL_LOG_FILE", "log_max_bytes": "LORASPOOL_LOG_MAX_BYTES",
       "log_backups": "LORASPOOL_LOG_BACKUPS", "quiet_hours": "LORASPOOL_QUIET_HOURS",
       "stall_minutes": "LORASPOOL_STALL_MINUTES", "cpu_quantization": "LORASPOOL_CPU_QUANTIZATION",
       "gpu_memory_gib": "LORASPOOL_GPU_MEMORY_GIB"}
CONFIG_ENV = "LORASPOOL_CONFIG"
# Only for a worker that a submitter starts for one job; never a machine's standing setting.
FLAG_ONLY = ("fallback", "only_job")
PATH_KEYS = ("share", "cache_dir", "log_file")
# Settings whose empty value means "none" (as --quiet-hours "" does): an empty variable clears the file's value.
# Elsewhere an empty variable is taken as unset, as shells and service managers leave them.
CLEARED_BY_EMPTY = frozenset({"quiet_hours"})
QUIET = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class ConfigError(Exception):
    """The settings are unusable. ``problems`` lists every one, each saying where the value came from."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"bad worker settings: {problems[0]}")
        else:
            lines = "\n".join(f"  - {p}" for p in problems)
            super().__init__(f"bad worker settings ({len(problems)} problems):\n{lines}")


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    share: Path = Field(description="The share's root folder: a mount point on Linux, a UNC path on Windows.")
    id: str = Field(description="Worker id: names its heartbeat and running/ folder. Default: the host name.")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    watch: Literal["auto", "native", "polling"] = "auto"
    devices: list[int] | None = Field(
        None, description='GPU indices this worker may use (as nvidia-smi numbers them); "all" or unset: every GPU.')
    max_concurrent_jobs: int | None = Field(
        None, ge=1, le=64, description="Jobs trained at once. Unset: one per usable GPU (one on a CPU worker).")
    allowed_model_roots: list[str] = Field(
        default_factory=list,
        description="Folders, relative to the share (or absolute inside it), that base models may come from. "
                    "Empty: anywhere in the share.")
    cache_dir: Path = Field(description="Local folder for verified copies of base models, off the network.")
    cache_models: bool = Field(True, description="Copy base models to cache_dir before training.")
    log_file: Path | None = Field(None, description="JSON-lines log file, rotated; unset: stderr only.")
    log_max_bytes: int = Field(10 * 1024 * 1024, ge=64 * 1024, description="Rotate the log file at this size.")
    log_backups: int = Field(5, ge=0, le=100, description="Rotated log files kept.")
    quiet_hours: str | None = Field(
        None, description='Local times with no new claims, "HH:MM-HH:MM"; may wrap midnight ("22:00-07:00").')
    stall_minutes: float = Field(
        60.0, ge=0, description="A job whose training process reports no progress for this long while copying, "
                                "preparing, evaluating or training (a chat template that never finishes, a hung "
                                "driver), or for 4 times as long while loading, saving, verifying or merging, is "
                                "ended and fails; 0: never.")
    cpu_quantization: Literal["plain", "bitsandbytes"] = Field(
        "plain", description='What a CPU worker does with a 4bit or 8bit job. "plain": trains plain LoRA on the fp32 '
                             'base (fastest on CPU; the result says so). "bitsandbytes": loads the base quantized, '
                             "with bitsandbytes' CPU kernels, as the job asked: a quarter of the memory for 4bit, "
                             "slower; for a machine whose memory cannot hold the fp32 base.")
    gpu_memory_gib: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Use at most this much of each GPU's memory, as a card of this size would: the rest stays free "
                    "for the person at the desk. Training plans for it (gradient checkpointing by the estimate) and "
                    "PyTorch's allocator refuses past it. Unset: the whole GPU.")
    fallback: bool = Field(False, description="Run by a submitter because no worker was live.")
    only_job: str | None = Field(None, description="Claim only this job, and exit once it has a result.")

    @field_validator("id")
    @classmethod
    def _safe(cls, v: str) -> str:
        if problem := id_problem(v):
            raise ValueError(problem)
        return v

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip().lower()
            if text in ("", "all"):
                return None
            try:
                return [int(x) for x in text.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f'{v!r} is not "all" or a list of GPU numbers like "0,1"') from None
        return v

    @field_validator("devices")
    @classmethod
    def _devices_sane(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError('is empty; leave it out (or write "all") to use every GPU, or name at least one')
        if any(i < 0 for i in v) or len(set(v)) != len(v):
            raise ValueError(f"{v} must be distinct GPU numbers, 0 or more")
        return v

    @field_validator("allowed_model_roots", mode="before")
    @classmethod
    def _roots_text(cls, v: Any) -> Any:
        return [part.strip() for part in v.split(",") if part.strip()] if isinstance(v, str) else v

    @field_validator("allowed_model_roots")
    @classmethod
    def _roots(cls, v: list[str]) -> list[str]:
        out = []
        for root in v:
            if problem := _root_problem(root):
                raise ValueError(problem)
            out.append(root if _is_absolute(root) else root.replace("\\", "/").strip("/"))
        return out

    @field_validator("quiet_hours")
    @classmethod
    def _quiet(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        start, end = _parse_quiet(v)
        if start == end:
            raise ValueError(f"{v!r} starts and ends at the same time; leave quiet_hours out for no quiet hours")
        return f"{start:%H:%M}-{end:%H:%M}"


def _is_absolute(path: str) -> bool:
    return PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute()


def _root_problem(root: str) -> str | None:
    if not root.strip():
        return "an empty folder name; remove it from the list"
    if ".." in root.replace("\\", "/").split("/"):
        return f"{root!r} has a '..' component; name a folder inside the share, like \"models\""
    return None


def _parse_quiet(text: str) -> tuple[time, time]:
    m = QUIET.match(text)
    if not m:
        raise ValueError(f'{text!r} is not "HH:MM-HH:MM", like "22:00-07:00"')
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if not (h1 < 24 and h2 < 24 and m1 < 60 and m2 < 60):
        raise ValueError(f"{text!r} has a time outside 00:00-23:59")
    return time(h1, m1), time(h2, m2)


# ── where things live ───────────────────────────────────────────────────────────────────────────────
def default_worker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]).strip("-._") or "worker"
    return host[:64]


def default_config_path(env: Mapping[str, str] | None = None, platform: str = sys.platform) -> Path:
    """Where a machine keeps its worker settings: one place per OS, readable by the service account."""
    env = os.environ if env is None else env
    if platform == "win32":
        return Path(env.get("ProgramData") or env.get("PROGRAMDATA") or r"C:\ProgramData", "loraspool",
                    "loraspool.toml")
    return Path("/etc/loraspool/loraspool.toml")


def default_cache_dir(env: Mapping[str, str] | None = None, platform: str = sys.platform) -> Path:
    """systemd's CacheDirectory= when run by the unit; otherwise a machine-wide (Windows) or per-user folder."""
    env = os.environ if env is None else env
    if env.get("CACHE_DIRECTORY"):
        return Path(env["CACHE_DIRECTORY"].split(":")[0])
    if platform == "win32":
        return Path(env.get("ProgramData") or env.get("PROGRAMDATA") or r"C:\ProgramData", "loraspool", "cache")
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "loraspool")


def config_path(flags: Mapping[str, Any], env: Mapping[str, str],
                default: Path | None = None) -> tuple[Path, str | None]:
    """The settings file and who named it (None: the per-OS default, which may be absent)."""
    if flags.get("config"):
        return Path(flags["config"]), "--config"
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]), f"${CONFIG_ENV}"
    return (default or default_config_path(env)), None


# ── the merge ───────────────────────────────────────────────────────────────────────────────────────
def _read_file(path: Path, named_by: str | None, problems: list[str]) -> dict[str, Any]:
    if not path.is_file():
        if named_by is not None:
            problems.append(f"{named_by} {path}: no such file; create it (deploy/README.md has an example) or "
                            f"leave {named_by} out")
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path}: cannot read it ({e}); let the worker's account read it")
        return {}
    except tomllib.TOMLDecodeError as e:
        problems.append(f"{path}: not valid TOML ({e}); fix that line")
        return {}
    return _known_keys(path, data, problems)


def _known_keys(path: Path, data: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    allowed = [k for k in WorkerSettings.model_fields if k not in FLAG_ONLY]
    out = {}
    for key, value in data.items():
        if key in allowed:
            out[key] = value
            continue
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(allowed)}"
        problems.append(f"{path}: {key}: unknown key{hint}")
    return out


def _flag_name(name: str) -> str:
    return {"id": "--id", "only_job": "--only", "allowed_model_roots": "--allowed-model-root"}.get(
        name, "--" + name.replace("_", "-"))


def _merge(flags: Mapping[str, Any], env: Mapping[str, str], file: dict[str, Any],
           path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in WorkerSettings.model_fields:
        if flags.get(name) is not None:
            values[name], sources[name] = flags[name], f"flag {_flag_name(name)}"
        elif name in ENV and (env.get(ENV[name]) or (name in CLEARED_BY_EMPTY and ENV[name] in env)):
            values[name], sources[name] = env[ENV[name]], f"env {ENV[name]}"
        elif name in file:
            value = file[name]
            if name in PATH_KEYS and isinstance(value, str) and value and not _is_absolute(value):
                value = str(path.parent / value)  # relative to the file, not to wherever the service starts
            values[name], sources[name] = value, f"file {path}"
    return values, sources


def _fill_defaults(values: dict[str, Any], sources: dict[str, str], env: Mapping[str, str]) -> None:
    if "id" not in values:
        values["id"], sources["id"] = default_worker_id(), "host name"
    if "cache_dir" not in values:
        values["cache_dir"] = default_cache_dir(env)
        sources["cache_dir"] = "default ($CACHE_DIRECTORY)" if env.get("CACHE_DIRECTORY") else "default"
    for name in WorkerSettings.model_fields:
        sources.setdefault(name, "default")


def _explain(err: dict[str, Any], sources: Mapping[str, str], path: Path) -> str:
    key = str(err["loc"][0]) if err["loc"] else "settings"
    where = ".".join(str(p) for p in err["loc"]) or key
    if err["type"] == "missing" and key == "share":
        return (f"share: no share given; pass --share PATH, set LORASPOOL_SHARE, or add share = \"/mnt/share\" to "
                f"{path}")
    msg = str(err["msg"]).removeprefix("Value error, ")
    if "input" in err and err["type"] != "value_error" and not isinstance(err["input"], dict | list):
        msg = f"{msg}, got {err['input']!r}"
    return f"{sources.get(key, 'default')}: {where}: {msg}"


def resolve(flags: Mapping[str, Any], env: Mapping[str, str] | None = None, *,
            default_config: Path | None = None) -> tuple[WorkerSettings, dict[str, str]]:
    """Merge flags (None = not given) over ``LORASPOOL_*`` over ``loraspool.toml`` over defaults.

    Returns the settings and, for every field, where its value came from. ``flags["config"]`` (or
    ``$LORASPOOL_CONFIG``) names the file; without either, the per-OS default is read if it exists.
    Raises ConfigError listing every problem at once.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    path, named_by = config_path(flags, env, default_config)
    file = _read_file(path, named_by, problems)
    values, sources = _merge(flags, env, file, path)
    _fill_defaults(values, sources, env)
    try:
        settings = WorkerSettings.model_validate(values)
    except ValidationError as e:
        problems += [_explain(err, sources, path) for err in e.errors()]
        settings = None
    if problems or settings is None:
        raise ConfigError(problems)
    return settings, sources


# ── what the daemon asks of them ────────────────────────────────────────────────────────────────────
def in_quiet_hours(settings: WorkerSettings, local_time: datetime | time) -> bool:
    """True when no new job may be claimed: ``local_time`` falls in [start, end), across midnight if need be."""
    if settings.quiet_hours is None:
        return False
    start, end = _parse_quiet(settings.quiet_hours)
    now = (local_time.time() if isinstance(local_time, datetime) else local_time).replace(tzinfo=None)
    if start < end:
        return start <= now < end
    return now >= start or now < end


def model_allowed(settings: WorkerSettings, share_root: Path, model_dir: Path) -> str | None:
    """Why ``model_dir`` (already resolved inside the share) may not be trained from here, or None if it may."""
    if not settings.allowed_model_roots:
        return None
    real_root = Path(os.path.realpath(share_root))
    target = Path(os.path.realpath(model_dir))
    for root in settings.allowed_model_roots:
        allowed = Path(os.path.realpath(root if _is_absolute(root) else real_root / root))
        if target == allowed or allowed in target.parents:
            return None
    try:
        shown = target.relative_to(real_root).as_posix()
    except ValueError:
        shown = str(target)
    return (f"{shown!r} is outside the folders this worker takes base models from "
            f"({', '.join(settings.allowed_model_roots)}); move the model into one of them, or add its folder "
            f"to the worker's allowed_model_roots (loraspool.toml, LORASPOOL_ALLOWED_MODEL_ROOTS or "
            f"--allowed-model-root; loraspool config show says where it is set)")


def gpu_indices(settings: WorkerSettings, gpu_count: int) -> list[int]:
    """The GPUs this worker may use: ``devices`` that exist, or all of them."""
    if settings.device == "cpu":
        return []
    if settings.devices is None:
        return list(range(gpu_count))
    return [i for i in settings.devices if i < gpu_count]


def devices_problem(settings: WorkerSettings, gpu_count: int) -> str | None:
    """A sentence for the log when ``devices`` names GPUs this machine does not have, else None."""
    if settings.devices is None or settings.device == "cpu":
        return None
    missing = [i for i in settings.devices if i >= gpu_count]
    if not missing:
        return None
    has = f"{gpu_count} (0-{gpu_count - 1})" if gpu_count else "none that the NVIDIA driver shows"
    return (f"devices names GPU {', '.join(map(str, missing))}, but this machine has {has}; fix devices in "
            "loraspool.toml (nvidia-smi -L lists them)")


def concurrency(settings: WorkerSettings, gpu_count: int) -> int:
    """Jobs to run at once: the setting, or one per usable GPU, and at least one."""
    if settings.max_concurrent_jobs is not None:
        return settings.max_concurrent_jobs
    return max(1, len(gpu_indices(settings, gpu_count)))
