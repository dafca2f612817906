"""The environment a training child is started with: on CPU, glibc's malloc keeps what it frees.

A CPU training step allocates its activations and frees them again, gigabytes every step. glibc hands large
blocks back to the kernel when they are freed (anything over its mmap threshold, which stops adapting at 32 MB,
and whatever the trim threshold lets go from the top of the heap), so the next step faults every page in again
and the kernel zeroes each one. Measured with ``getrusage`` on gpt2-small, four packed rows of 512 tokens per
step, 2 cores (a VM, where a fault costs more than on bare metal): 0.6 to 1.9 million minor faults and 3 to 9 s of
system time per 12 to 19 s step. With freed memory kept in the heap, steps after the second fault nothing and
take 10 s; peak RSS is 17% higher (the heap fragments). ``hugetlb=1`` asks for transparent huge pages where the
kernel's THP mode is ``madvise``, so the first steps fault 2 MB at a time.

CPU workers only: a GPU job's host memory holds the base while it loads, and a heap that never shrinks would
keep that copy after the weights moved to the GPU. glibc 2.36 or newer only, the version measured: older ones cap
``mmap_threshold`` at 32 MB and drop the 4 GB asked for, and ``trim_threshold`` alone then pins the mmap threshold
at 128 KB, which faults far more than the default (with trim_threshold alone, on 2.36: 43,950 minor faults
per round of thirty 6 MB tensors, against 209). Other C libraries (Windows, musl) are left alone, and so is a
``GLIBC_TUNABLES`` the person set.

The tunables are read once, when a process starts, so they must be in the environment the training child is
spawned with. The worker puts them in its own environment once, at start-up (``prepare``), and every child
inherits them. Never per spawn: ``setenv`` while another thread is in C's ``getenv`` (``localtime`` reads TZ for
every log line) can read freed memory in glibc before 2.40, and the daemon has threads by then.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, MutableMapping

TUNABLES = "GLIBC_TUNABLES"
CPU_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4294967296"
                ":glibc.malloc.trim_threshold=68719476736")
MEASURED_GLIBC = (2, 36)


def for_training(device: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` for a child that trains on ``device``."""
    if device != "cpu" or TUNABLES in environ or not _measured_glibc():
        return {}
    return {TUNABLES: CPU_TUNABLES}


def prepare(device: str, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Put the variables in ``environ`` (this process's, by default), for every child started from now on. Once:
    a second call finds them there and adds nothing. True when it added them."""
    extra = for_training(device, environ)
    environ.update(extra)
    return bool(extra)


def _measured_glibc() -> bool:
    name, version = platform.libc_ver()
    try:
        return name == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= MEASURED_GLIBC
    except ValueError:
        return False
