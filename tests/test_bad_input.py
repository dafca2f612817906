"""Every bad input gets a ``rejected`` record naming the field and the problem, and the worker goes on."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from spooler.errors import Rejected
from spooler.jobfile import CutShort, parse_spec
from spooler.share import Share
from tests.conftest import Procs, drop, log_of, rejected_for, result_of, wait_for, wait_result

GOOD = {"kind": "train", "base_model": "models/tiny", "dataset": "datasets/alpaca.jsonl"}

# (file name, bytes, the field the error must name, words it must contain)
BAD_FILES = [
    ("notjson.json", b"{'kind': 'probe'}", "file", "not valid JSON"),
    ("cut.json", b'{"kind": "probe", "priority": \n', "file", "at the end of the file, which stops before the JSON"),
    ("cututf8.json", '{"kind": "probe", "id": "caf\xe9'.encode()[:-1], "file", "stops inside a character"),
    ("cutnum.json", b'{"kind": "probe", "priority": 0.', "file", "stops inside a value"),
    ("cuttrue.json", b'{"kind": "probe", "training": {"compile": tr', "file", "stops inside a value"),
    ("latin1.json", '{"kind": "probe", "id": "caf\xe9"}'.encode("latin-1"), "file", "not UTF-8"),
    ("huge.json", b'{"kind": "probe", "pad": "' + b"x" * 300_000 + b'"}', "file", "over the"),
    ("deep.json", b'{"kind": "probe", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "file", "nested 10001 levels"),
    ("array.json", b"[1, 2, 3]", "file", "must be a JSON object"),
    ("bigint.json", b'{"kind": "probe", "priority": ' + b"1" * 5000 + b"}", "file", "not a usable JSON value"),
    ("kind.json", json.dumps({**GOOD, "kind": "trian"}).encode(), "kind", "did you mean 'train'"),
    ("typo.json", json.dumps({**GOOD, "lora": {"alpah": 16}}).encode(), "lora.alpah", "did you mean 'alpha'"),
    ("typo2.json", json.dumps({**GOOD, "trainig": {}}).encode(), "trainig", "did you mean 'training'"),
    ("negsteps.json", json.dumps({**GOOD, "training": {"max_steps": -5}}).encode(), "training.max_steps", "-5"),
    ("badid.json", json.dumps({**GOOD, "id": "../../etc/passwd"}).encode(), "id", "not a safe file name"),
    ("con.json", json.dumps({**GOOD, "id": "CON"}).encode(), "id", "Windows reserves"),
    ("dotdot.json", json.dumps({**GOOD, "base_model": "../outside"}).encode(), "base_model", "'..'"),
    ("abs.json", json.dumps({**GOOD, "dataset": "/etc/passwd"}).encode(), "dataset", "absolute"),
    ("drive.json", json.dumps({**GOOD, "dataset": "C:\\data\\x.jsonl"}).encode(), "dataset", "absolute"),
    ("missing.json", json.dumps({"kind": "train"}).encode(), "job", "needs base_model and dataset"),
    ("newline.json", json.dumps({**GOOD, "id": "abc\n"}).encode(), "id", "not a safe file name"),
    ("device.json", json.dumps({**GOOD, "dataset": "datasets/CON"}).encode(), "dataset", "Windows reserves"),
    ("com1sup.json", json.dumps({**GOOD, "dataset": "datasets/COM\u00b9.jsonl"}).encode(), "dataset",
     "Windows reserves"),
    ("longname.json", json.dumps({**GOOD, "dataset": "datasets/" + "a" * 300}).encode(), "dataset", "allow 255 bytes"),
    ("longpath.json", json.dumps({**GOOD, "dataset": "datasets/" + "a/" * 2100 + "x"}).encode(), "dataset",
     "1024 bytes at most"),
    ("dupkey.json", b'{"kind": "probe", "id": "first", "id": "second"}', "id", "appears twice"),
    ("longprobe.json", json.dumps({**GOOD, "probes": ["Why? " * 801]}).encode(), "probes.0", "at most 4000 characters"),
    ("surrogate.json", json.dumps({**GOOD, "probes": ["\ud800"]}).encode(), "file", "half of a UTF-16 pair"),
    ("seed.json", json.dumps({**GOOD, "training": {"seed": 2**64}}).encode(), "training.seed", "less than"),
    ("nanweight.json", json.dumps({"kind": "merge", "merge": {"adapters": ["a/v1", "b/v1"], "into": "adapter",
                                                              "weights": [1, float("nan")]}}).encode(),
     "merge.weights.1", "finite"),
    ("infalpha.json", json.dumps({**GOOD, "lora": {"alpha": 1.5}}).encode().replace(b"1.5", b"1e999"), "lora.alpha",
     "finite"),
    ("infminutes.json", json.dumps({**GOOD, "training": {"checkpoint_every_minutes": 1.5}}).encode().replace(
        b"1.5", b"Infinity"), "training.checkpoint_every_minutes", "finite"),
    ("mergeout.json", json.dumps({"kind": "merge", "merge": {"adapters": ["a/v1"], "into": "base",
                                                             "output": "results/other"}}).encode(),
     "merge.output", "not under models/"),
]


@pytest.mark.parametrize(("name", "data", "field", "words"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_parse_names_field_and_problem(name: str, data: bytes, field: str, words: str) -> None:
    with pytest.raises(Rejected) as e:
        parse_spec(data, name, max_bytes=256 * 1024)
    assert e.value.field == field
    assert words in str(e.value), str(e.value)
    assert isinstance(e.value, CutShort) is name.startswith("cut"), "a copy still arriving waits 10x longer"


def test_worker_rejects_every_bad_file_and_goes_on(share: Share, procs: Procs, tmp_path: Path) -> None:
    outside = tmp_path / "outside-model"
    outside.mkdir()
    (share.root / "models" / "escape").symlink_to(outside, target_is_directory=True)
    bad = [*BAD_FILES,
           ("symlink.json", json.dumps({**GOOD, "base_model": "models/escape"}).encode(), "base_model",
            "outside the share"),
           ("nomodel.json", json.dumps({**GOOD, "base_model": "models/nothere"}).encode(), "base_model",
            "does not exist")]
    for name, data, _, _ in bad:
        drop(share, name, data)
    w = procs.worker(share, "w1")
    records = wait_for(lambda: all(rejected_for(share, n) for n, *_ in bad) and
                       {n: rejected_for(share, n) for n, *_ in bad}, 60, "a rejection for every bad file")
    for name, data, field, words in bad:
        r = records[name]
        assert r.error.startswith(f"{field}: ") and words in r.error, (name, r.error)
        assert (share.result_dir(r.id) / "job.json").read_bytes() == data, "the person's bytes are kept"
    drop(share, "after.json", {"kind": "probe"})
    assert wait_result(share, "after", 30).status.value == "succeeded"
    assert w.poll() is None, "the worker is still running"
    assert os.listdir(share.inbox) == []


def test_a_link_folder_or_fifo_in_the_inbox_is_named_in_the_log_and_left_alone(share: Share, procs: Procs,
                                                                                 tmp_path: Path) -> None:
    """Never followed nor moved (a link could lead anywhere; a FIFO would block the read), but no longer skipped
    without a word: the person who dropped it learns from the worker's log why no result comes."""
    target = tmp_path / "job.json"
    target.write_text(json.dumps({"kind": "probe"}))
    (share.inbox / "lnk.json").symlink_to(target)
    (share.inbox / "dir.json").mkdir()
    os.mkfifo(share.inbox / "fifo.json")
    w = procs.worker(share, "w1")
    drop(share, "after.json", {"kind": "probe"})
    assert wait_result(share, "after", 30).status.value == "succeeded"
    text = log_of(w)
    assert "inbox/lnk.json is a symbolic link, not a job file" in text
    assert "inbox/dir.json is a folder, not a job file" in text
    assert "inbox/fifo.json is not a regular file (a FIFO, socket or device), not a job file" in text
    assert sorted(os.listdir(share.inbox)) == ["dir.json", "fifo.json", "lnk.json"] and target.exists()


def test_rejected_id_stays_free_for_the_corrected_job(share: Share, procs: Procs) -> None:
    procs.worker(share, "w1")
    drop(share, "fixme.json", {"id": "fixme", "kind": "probe", "priorty": 1})
    first = wait_for(lambda: rejected_for(share, "fixme.json"), 30, "the rejection")
    assert first.error == "priorty: unknown field; did you mean 'priority'?"
    drop(share, "fixme.json", {"id": "fixme", "kind": "probe", "priority": 1})
    assert wait_result(share, "fixme", 30).status.value == "succeeded"
    assert result_of(share, first.id).status.value == "rejected"


def test_a_file_the_share_cannot_rename_stays_and_blocks_nothing(share: Share, procs: Procs) -> None:
    long_name = "a" * 245 + ".json"  # the grab's token prefix takes the name past 255 bytes
    drop(share, long_name, {"kind": "probe"})
    drop(share, "b-after.json", {"kind": "probe"})
    w = procs.worker(share, "w1")
    assert wait_result(share, "b-after", 30).status.value == "succeeded"
    assert (share.inbox / long_name).exists(), "left where the person put it"
    wait_for(lambda: "not taken" in log_of(w), 10, "the worker to say why")
    time.sleep(1.0)
    assert log_of(w).count("not taken") == 1, "one line, not one per scan"
    assert w.poll() is None


def test_an_odd_origin_record_does_not_stop_the_worker(share: Share, procs: Procs) -> None:
    """``results/<id>/origin.json`` is on the share for anyone to edit: a ``source_file`` that is not a string
    is left out of the result; the job runs and the worker goes on."""
    from spooler.clock import SystemClock
    from spooler.intake import Intake

    drop(share, "odd.json", {"id": "odd", "kind": "probe"})
    Intake(share, "submitter", SystemClock()).scan()
    origin = share.result_dir("odd") / "origin.json"
    origin.write_text(json.dumps({**json.loads(origin.read_text()), "source_file": ["odd.json"]}))
    w = procs.worker(share, "w1")
    result = wait_result(share, "odd", 30)
    assert result.status.value == "succeeded" and result.source_file is None
    drop(share, "after.json", {"id": "after", "kind": "probe"})
    assert wait_result(share, "after", 30).status.value == "succeeded" and w.poll() is None


@pytest.mark.parametrize("content", [{"id": "named-ok", "kind": "probe"}, {"kind": "probe", "priorty": 1}],
                         ids=["runs", "rejected"])
def test_a_file_name_that_is_not_utf8_gets_its_result_and_the_worker_goes_on(
        share: Share, procs: Procs, content: dict) -> None:
    """A Linux client can name a file with any bytes; Python gives the odd ones as lone surrogates, which JSON
    cannot carry. The result names the file with a backslash escape instead of crashing the worker."""
    with open(os.fsencode(share.inbox) + b"/odd\xff.json", "w") as f:  # noqa: PTH123 - a bytes path
        json.dump(content, f)
    w = procs.worker(share, "w1")
    if "id" in content:
        assert wait_result(share, "named-ok", 30).source_file == "odd\\udcff.json"
    else:
        first = wait_for(lambda: list(share.results.glob("rejected-odd*/result.json")), 30, "the rejection")
        assert "priorty" in json.loads(first[0].read_text())["error"]
    drop(share, "after.json", {"id": "after", "kind": "probe"})
    assert wait_result(share, "after", 30).status.value == "succeeded" and w.poll() is None


def test_an_error_that_quotes_a_name_that_is_not_utf8_is_written_and_the_worker_goes_on(
        train_share: Share, procs: Procs) -> None:
    """A model folder whose only weights file has a name that is not UTF-8: the rejection quotes the name, and
    writing it must not fail (the job would then stay held and run again and again)."""
    from tests.conftest import train_job

    odd = train_share.root / "models" / "odd"
    odd.mkdir()
    (odd / "config.json").write_bytes((train_share.root / "models" / "tiny" / "config.json").read_bytes())
    with open(os.fsencode(odd) + b"/weights\xff.bin", "wb") as f:  # noqa: PTH123 - a bytes path
        f.write(b"not a pickle")
    w = procs.worker(train_share, "w1")
    drop(train_share, "oddw.json", {**train_job("oddw"), "base_model": "models/odd"})
    r = wait_result(train_share, "oddw", 60)
    assert r.status.value == "rejected" and "weights\\udcff.bin" in r.error and r.error.startswith("base_model: ")
    drop(train_share, "after.json", {"id": "after", "kind": "probe"})
    assert wait_result(train_share, "after", 30).status.value == "succeeded" and w.poll() is None
    assert log_of(w).count("job oddw claimed") == 1, "run once"
