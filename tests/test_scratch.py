"""Scratch folders a killed training child leaves on the worker's disk are removed; nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spooler.share import Share
from tests.conftest import Procs, log_of, wait_for
from worker import scratch

MAKER = """
import tempfile, time
from worker import scratch
for kind in ("merge", "ddp"):
    made = tempfile.mkdtemp(prefix=scratch.prefix(kind))
    open(made + "/adapter_model.safetensors", "wb").close()
    print(made, flush=True)
time.sleep(600)
"""


def _age(folder: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(folder, (then, then))


def test_a_killed_processes_scratch_folders_are_removed_by_the_next_worker_pass(share: Share, procs: Procs,
                                                                                  tmp_path: Path) -> None:
    """A merge staged in the system temp folder was left there for good when a cancel ended the training child
    mid-merge (the last note). The worker now removes such a folder once its maker is dead and it is older than
    MIN_AGE (a younger one may belong to another pid namespace's live process); a live process's folder, a
    young one and anything not named by ``scratch.prefix`` stay."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    maker = subprocess.Popen([sys.executable, "-c", MAKER], stdout=subprocess.PIPE, env=env)
    assert maker.stdout is not None
    merge, young = (Path(maker.stdout.readline().decode().strip()) for _ in range(2))
    maker.kill()  # SIGKILL: no cleanup runs
    maker.wait()
    alive = Path(tempfile.mkdtemp(prefix=scratch.prefix("ddp"), dir=tmp))  # this test's own: its maker lives
    other = tmp / "loraspool-merge-notapid-x"
    other.mkdir()
    huge = tmp / "loraspool-merge-99999999999-x"  # psutil.pid_exists raised OverflowError: the worker died (review)
    huge.mkdir()
    for folder in (merge, alive, other, huge):
        _age(folder, 2 * scratch.MIN_AGE)
    worker = procs.worker(share, "w1", env={"TMPDIR": str(tmp)})
    wait_for(lambda: not merge.exists(), 60, "the killed merge's scratch folder removed", explain=procs.tails)
    wait_for(lambda: "removed 1 scratch folder(s)" in log_of(worker), 10, "the removal logged", explain=procs.tails)
    assert young.exists() and alive.exists() and other.exists() and huge.exists() and worker.poll() is None
