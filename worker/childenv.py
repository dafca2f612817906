"""The environment a training child is started with: on CPU, glibc's malloc keeps what it frees.

A CPU training step allocates its activations and frees them again, gigabytes every step. glibc hands large
blocks back to the kernel when they are freed (anything over its mmap threshold, which stops adapting at 32 MB,
and whatever the trim threshold lets go from the top of the heap), so the next step faults every page in again
and the kernel zeroes each one. Measured with ``getrusage`` on gpt2-small, four packed rows of 512 tokens per
step, 2 cores (a VM, where a fault costs more than on bare metal): 0.6 to 1.9 million minor faults and 3 to 9 s of
system time per 12 to 19 s step. With freed memory kept in the heap, steps after the second fault nothing and
take 10 s; peak RSS is 17% higher (the heap fragments). ``hugetlb=1`` asks for transparent huge pages where the
kernel's THP mode is ``madvise``, so the first steps fault 2 MB at a time.

CPU jobs only: a GPU job's host memory holds the base while it loads, and a heap that never shrinks would keep
that copy after the weights moved to the GPU. The tunables are read once, when a process starts, so they go in
the environment the child is spawned with. A ``GLIBC_TUNABLES`` the person set is theirs and is left as it is;
other C libraries (Windows, musl) ignore the variable.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping

TUNABLES = "GLIBC_TUNABLES"
CPU_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4294967296"
                ":glibc.malloc.trim_threshold=68719476736")


def for_training(device: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` for a child that trains on ``device``."""
    if device != "cpu" or TUNABLES in environ or platform.libc_ver()[0] != "glibc":
        return {}
    return {TUNABLES: CPU_TUNABLES}
