"""Adapters you can trust (issue #4), on the tiny model on CPU: registration, verification with each corruption
caught for the right reason, chains, compatibility, merging, size levels and retention.

One module-scoped share holds a chain support/v1 -> v2 -> v3, a billing/v1 and a wide/v1 (another rank and
other target modules), each trained for a few steps in this process the way the worker's child trains them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from schemas.adapter import MANIFEST, Manifest, MergedModel
from schemas.job import JobSpec
from schemas.result import Result, Terminal
from schemas.verify import CheckStatus, VerifyReport
from spooler import claim, registry, states
from spooler.clock import SystemClock
from spooler.errors import Rejected
from spooler.intake import Intake
from spooler.jobfile import parse_spec
from spooler.share import Share, read_model
from tests.conftest import drop, make_share, result_of, train_job
from worker.train import TrainOutcome, TrainRequest, run_training
from worker.verify import base_identity

STEPS = 4


# ── the module's share ───────────────────────────────────────────────────────────────────────────────────
def _job(job_id: str, **fields: Any) -> JobSpec:
    lora = fields.pop("lora", {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    training = {"max_steps": STEPS, "batch_size": 8, "learning_rate": 3e-3, "max_length": 64,
                **fields.pop("training", {})}
    return JobSpec(id=job_id, kind=fields.pop("kind", "train"), base_model=fields.pop("base_model", "models/tiny"),
                   dataset=fields.pop("dataset", "datasets/alpaca.jsonl"), lora=lora, training=training, **fields)


def _request(share: Share, job: JobSpec) -> TrainRequest:
    model = share.root / job.base_model if job.base_model else None
    return TrainRequest(job=job, model_dir=model, datasets=[share.root / d for d in job.dataset_files()],
                        share_root=share.root, out_dir=share.result_dir(job.id or "x") / "attempts" / "a1-w",
                        device="cpu", file_mode=share.file_mode)


def run(share: Share, job: JobSpec) -> Any:
    """A job the way the worker's child runs it (worker.train.run_training), in this process."""
    return run_training(_request(share, job), lambda _p: None, lambda: False)


@pytest.fixture(scope="module")
def share(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Share:
    from worker.tinymodel import build_tiny_model, write_dataset

    s = make_share(tmp_path_factory.mktemp("adapters") / "share")
    shutil.copytree(tiny_model_dir, s.root / "models" / "tiny")
    build_tiny_model(s.root / "models" / "tiny-other", seed=1)  # same shapes, other weights
    write_dataset(s.root / "datasets" / "alpaca.jsonl", "alpaca", rows=64)
    write_dataset(s.root / "datasets" / "chat.jsonl", "chat", rows=64, seed=3)
    return s


@pytest.fixture(scope="module")
def trained(share: Share) -> dict[str, TrainOutcome]:
    out = {"s1": run(share, _job("s1", register_as="support"))}
    out["s2"] = run(share, _job("s2", parent="support/v1"))
    out["s3"] = run(share, _job("s3", parent="support/v2"))
    out["b1"] = run(share, _job("b1", register_as="billing", training={"seed": 1}))
    out["w1"] = run(share, _job("w1", register_as="wide", lora={"r": 8, "alpha": 16, "target_modules": ["q_proj"]}))
    return out


def version(share: Share, ref: str) -> Path:
    return registry.version_dir(share, registry.Ref.parse(ref))


def copy_of(share: Share, ref: str, tmp_path: Path) -> Path:
    """A copy of a registered version (manifest included) to corrupt; the registry itself is never touched."""
    dest = tmp_path / ref.replace("/", "-")
    shutil.copytree(version(share, ref), dest)
    return dest


def check(report: VerifyReport, name: str) -> Any:
    return next(c for c in report.checks if c.name == name)


def verify_folder(share: Share, folder: Path, **options: Any) -> VerifyReport:
    from worker.adapter_verify import folder_target, verify

    return verify(folder_target(folder, folder.name, share, **options))


def rewrite_tensors(folder: Path, change: Any) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


# ── registration ─────────────────────────────────────────────────────────────────────────────────────────
def test_trained_adapters_are_registered_with_a_full_manifest(share: Share, trained: dict) -> None:
    assert [trained[k].registered for k in ("s1", "s2", "s3", "b1", "w1")] == \
        ["support/v1", "support/v2", "support/v3", "billing/v1", "wide/v1"]
    m = registry.read_manifest(share, registry.Ref("support", 2))
    assert m is not None and (m.name, m.version, m.origin, m.job_id) == ("support", "v2", "train", "s2")
    assert m.parents == ["support/v1"]
    folder = version(share, "support/v2")
    for name, entry in m.files.items():
        assert (folder / name).stat().st_size == entry.size
    assert set(m.files) == {p.name for p in folder.iterdir()} - {MANIFEST}
    assert "adapter_model.safetensors" in m.files and m.size_bytes == sum(e.size for e in m.files.values())
    fresh = base_identity(share.root / "models" / "tiny", "models/tiny")
    assert (m.base.path, m.base.sha256, m.base.size_bytes) == ("models/tiny", fresh.sha256, fresh.size_bytes)
    assert set(m.base.files) == {"config.json", "model.safetensors"}
    assert (m.lora.r, m.lora.alpha, m.lora.target_modules, m.lora.quantization) == (4, 8.0, ["q_proj", "v_proj"],
                                                                                    "none")
    assert m.dataset is not None and m.dataset.sha256 == trained["s2"].data.sha256 and m.dataset.eval_rows > 0
    assert m.metrics is not None and m.metrics.eval_loss_after == trained["s2"].metrics.eval_loss_after
    assert m.training is not None and m.training.max_steps == STEPS
    names = sorted(p.name for p in (registry.root(share) / "support").iterdir())
    assert names == ["v1", "v2", "v3"], "a temp folder was left behind"


def test_registration_is_once_per_job(share: Share, trained: dict) -> None:
    o = trained["b1"]
    again = registry.register_trained(share, _job("b1", register_as="billing", training={"seed": 1}),
                                      o.adapter_dir, o.metrics, o.data)
    assert str(again) == "billing/v1" and registry.numbers(share, "billing") == [1]


def test_a_planted_copy_naming_the_job_does_not_take_its_registration(share: Share, trained: dict) -> None:
    """A copy of billing/v1 planted as hijack/v1 with a manifest naming job "hj" (origin train, this base): its
    folder held exactly its manifest's files, so the idempotency check took it for the job's earlier
    registration, and the result named billing's weights (audit, proven). The trained files decide now."""
    import json

    from worker.verify import hash_folder

    planted = registry.root(share) / "hijack" / "v1"
    shutil.copytree(version(share, "billing/v1"), planted)
    manifest = json.loads((planted / "manifest.json").read_text())
    (planted / "manifest.json").write_text(json.dumps({**manifest, "name": "hijack", "version": "v1", "job_id": "hj",
                                                       "origin": "train"}))
    o = trained["s1"]
    ref = registry.register_trained(share, _job("hj", register_as="hijack"), o.adapter_dir, o.metrics, o.data,
                                    expected=hash_folder(o.adapter_dir)[0])
    assert str(ref) == "hijack/v2"
    weights = "adapter_model.safetensors"
    assert hash_folder(version(share, "hijack/v2"))[0][weights] == hash_folder(o.adapter_dir)[0][weights]


def test_racing_registrations_each_get_their_own_version(share: Share, trained: dict) -> None:
    """Eight threads register at once: the rename onto a taken v<N> fails, so each gets a distinct version."""
    source = trained["b1"].adapter_dir
    template = registry.read_manifest(share, registry.Ref("billing", 1))
    assert template is not None
    got: list[str] = []
    errors: list[BaseException] = []

    def register(i: int) -> None:
        try:
            m = template.model_copy(update={"job_id": f"race-{i}", "token": f"token-{i}"})
            got.append(str(registry.register(share, "race", source, m)))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(got) == sorted(f"race/v{n}" for n in range(1, 9))
    jobs = {registry.read_manifest(share, registry.Ref("race", n)).job_id for n in range(1, 9)}  # type: ignore
    assert jobs == {f"race-{i}" for i in range(8)}
    assert sorted(p.name for p in (registry.root(share) / "race").iterdir()) == sorted(f"v{n}" for n in range(1, 9))


def test_base_hashes_are_cached_by_size_and_mtime(share: Share, trained: dict) -> None:
    """The cache on the share is what spares an 8 GB base a rehash; --rehash reads the files again."""
    cache = registry.base_cache_file(share, "models/tiny")
    record = json.loads(cache.read_text())
    assert record["path"] == "models/tiny" and set(record["files"]) == {"config.json", "model.safetensors"}
    real = registry.base_identity_of(share, "models/tiny").sha256
    record["files"]["config.json"]["sha256"] = "0" * 64  # same size and mtime: the cache is believed
    cache.write_text(json.dumps(record))
    try:
        assert registry.base_identity_of(share, "models/tiny").sha256 != real
        assert registry.base_identity_of(share, "models/tiny", rehash=True).sha256 == real
    finally:
        registry.base_identity_of(share, "models/tiny", rehash=True)  # rewrites the true hashes
    assert registry.base_identity_of(share, "models/tiny").sha256 == real


def test_a_parent_must_be_registered_and_on_the_same_base(share: Share, trained: dict) -> None:
    with pytest.raises(Rejected, match=r"'support/v9' is not registered \(support has v1, v2, v3\)") as e:
        run(share, _job("p-missing", parent="support/v9"))
    assert e.value.field == "parent"
    with pytest.raises(Rejected, match=r"was trained on models/tiny .* base_model models/tiny-other") as e:
        run(share, _job("p-other", parent="support/v1", base_model="models/tiny-other"))
    assert e.value.field == "parent"


def test_register_refuses_a_child_whose_parent_is_not_registered(share: Share, trained: dict) -> None:
    """loraspool register on a share from before the registry, child first: registered anyway it would take the
    parent's number and name itself as its own parent (then vanish from the tree and pass verify --chain)."""
    from schemas.result import Metrics

    before = registry.refs(share)
    spec = JobSpec.model_validate(_job("late-child", parent="support/v99").model_dump())
    with pytest.raises(registry.RegistryError, match=r"its parent support/v99 is not registered on this share; "
                                                     r"register the job that trained support/v99 first"):
        registry.register_trained(share, spec, version(share, "support/v2"), Metrics(), None)
    assert registry.refs(share) == before


def test_a_version_whose_weights_are_a_pickle_is_never_loaded(share: Share, trained: dict) -> None:
    """A registered version whose safetensors someone swapped for adapter_model.bin: peft would unpickle it.
    As a parent or a merge input it is refused, naming the field; the pickle is never opened."""
    folder = registry.root(share) / "pickled" / "v1"
    shutil.copytree(version(share, "support/v1"), folder)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"not even a pickle: opening it would fail loudly")
    for job, field in ((_job("p-pickled", parent="pickled/v1"), "parent"),
                       (JobSpec(id="m-pickled", kind="merge", merge={"adapters": ["pickled/v1"], "into": "base"}),
                        "merge.adapters")):
        with pytest.raises(Rejected, match="no adapter_model.safetensors, and a pickle is never loaded") as e:
            run(share, job)
        assert e.value.field == field


def test_a_version_whose_manifest_does_not_parse_is_refused_by_name(share: Share, trained: dict) -> None:
    """Anyone can write a version's manifest.json. Unparseable, it crashed a merge (AttributeError) and a train
    job with that parent (AssertionError), both ending failed; and a verify passed, the files and base checks
    skipped for want of it (audit, proven). Each now refuses the version, naming the field."""
    folder = registry.root(share) / "garbled" / "v1"
    shutil.copytree(version(share, "support/v1"), folder)
    (folder / "manifest.json").write_text("{ this is not a manifest")
    try:
        for job, field in ((_job("p-garbled", parent="garbled/v1"), "parent"),
                           (JobSpec(id="m-garbled", kind="merge", merge={"adapters": ["garbled/v1"], "into": "base"}),
                            "merge.adapters"),
                           (JobSpec(id="v-garbled", kind="verify", verify={"adapter": "garbled/v1"}),
                            "verify.adapter")):
            with pytest.raises(Rejected, match="garbled/v1's manifest.json does not parse") as e:
                run(share, job)
            assert e.value.field == field
    finally:
        shutil.rmtree(folder.parent)  # the module's share stays one whose manifests all parse


def test_a_chain_verify_checks_each_versions_folder_as_a_single_verify_does(share: Share, trained: dict,
                                                                           tmp_path: Path) -> None:
    """verify {chain} skipped the folder check that {adapter} makes: a link in a version to a file outside the
    share was read, and a name from it showed up in the error; a FIFO would block the job for good (audit)."""
    outside = tmp_path / "private.safetensors"
    outside.write_bytes(b"secret")
    _register_copies(share, trained, "linked", [[]])
    (version(share, "linked/v1") / "zz.safetensors").symlink_to(outside)
    try:
        with pytest.raises(Rejected, match="'zz.safetensors' is a symlink to .*outside the share") as e:
            run(share, JobSpec(id="v-linked", kind="verify", verify={"chain": "linked"}))
        assert e.value.field == "verify.chain"
    finally:
        (version(share, "linked/v1") / "zz.safetensors").unlink()


def test_a_file_named_like_a_version_does_not_block_a_name(share: Share, trained: dict) -> None:
    """A file (or a dangling link) at adapters/NAME/v1 is no version, but the rename onto it failed ENOTDIR and
    every registration of NAME failed with it, merges and train jobs alike (audit, proven)."""
    (registry.root(share) / "blocked").mkdir()
    (registry.root(share) / "blocked" / "v1").write_text("not a version")
    _register_copies(share, trained, "blocked", [])
    source = trained["b1"].adapter_dir
    template = registry.read_manifest(share, registry.Ref("billing", 1))
    assert template is not None
    m = template.model_copy(update={"job_id": "blocked-1", "token": "blocked1", "parents": []})
    assert str(registry.register(share, "blocked", source, m)) == "blocked/v2"
    (registry.root(share) / "blocked" / "v1").unlink()


def test_a_merge_writes_nothing_through_a_planted_link(share: Share, trained: dict, tmp_path: Path) -> None:
    """merge.output a dangling link: exists() said no, and the job failed ENOTDIR at its last rename. tmp/ a link
    out of the share: a merge into an adapter staged its weights there, outside (audit, proven). It now stages on
    the worker's own disk, and writes nothing to tmp/ at all."""
    (share.root / "models" / "merged").mkdir(exist_ok=True)
    (share.root / "models" / "merged" / "dangle").symlink_to("gone-folder")  # in the share, and missing
    with pytest.raises(Rejected, match="already exists") as e:
        run(share, JobSpec(id="m-dangle", kind="merge",
                           merge={"adapters": ["billing/v1"], "into": "base", "output": "models/merged/dangle"}))
    assert e.value.field == "merge.output"
    (share.root / "models" / "merged" / "dangle").unlink()
    outside = tmp_path / "outside-tmp"
    outside.mkdir()
    kept = share.root / "tmp-kept"
    share.tmp.rename(kept)
    share.tmp.symlink_to(outside, target_is_directory=True)
    try:
        out = run(share, JobSpec(id="m-tmplink", kind="merge", register_as="tmplink",
                                 merge={"adapters": ["billing/v1", "support/v1"], "into": "adapter"}))
        assert out.verify.ok and out.registered == "tmplink/v1"
    finally:
        share.tmp.unlink()
        kept.rename(share.tmp)
        shutil.rmtree(share.root / "adapters" / "tmplink", ignore_errors=True)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("swapped", ["in tmp/", "where it was verified"])
def test_a_merge_registers_the_weights_it_verified(share: Share, trained: dict, monkeypatch: pytest.MonkeyPatch,
                                                   swapped: str) -> None:
    """A merge into an adapter was staged in the share's tmp/, which anyone can write: weights swapped there
    between their verification and their registration were registered as the merge, manifest hashes and all
    (last note: suspected; shown here). Simulated: someone swaps every staged merge in tmp/ for another adapter's
    weights the moment its verification ends. It now stages on the worker's own disk, and the copy into the
    registry must match the hashes of what was verified: a change even there is refused."""
    import worker.adapter_verify as adapter_verify
    from worker.verify import file_entries

    real_verify, seen = adapter_verify.verify, {}
    other = version(share, "support/v1") / "adapter_model.safetensors"

    def swapped_after(target: Any, device: str) -> Any:
        report = real_verify(target, device)
        if target.label.startswith("merge of"):
            seen.update({n: e.sha256 for n, e in file_entries(target.folder, skip=("manifest.json",)).items()})
            folders = list(share.tmp.glob(".merge-*")) if swapped == "in tmp/" else [target.folder]
            for staged in folders:
                shutil.copyfile(other, staged / "adapter_model.safetensors")
        return report

    monkeypatch.setattr(adapter_verify, "verify", swapped_after)
    job = JobSpec(id=f"m-swap-{len(swapped)}", kind="merge", register_as="swap",
                  merge={"adapters": ["billing/v1", "support/v1"], "into": "adapter"})
    try:
        if swapped == "where it was verified":
            with pytest.raises(registry.RegistryError, match="does not match its hashes"):
                run(share, job)
            assert not (share.root / "adapters" / "swap" / "v1").exists()
            return
        out = run(share, job)
        registered = registry.read_manifest(share, registry.Ref("swap", 1))
        assert out.registered == "swap/v1" and registered is not None
        assert {n: e.sha256 for n, e in registered.files.items()} == seen, "registered what it did not verify"
    finally:
        shutil.rmtree(share.root / "adapters" / "swap", ignore_errors=True)


def test_a_version_changed_since_it_was_registered_is_not_merged_or_continued(share: Share, trained: dict) -> None:
    """Its weights swapped for another adapter's: a merge used them, and recorded the manifest's hashes as what
    it merged (audit, proven). A parent or a merge input must now hold the files its manifest recorded."""
    _register_copies(share, trained, "swapped", [[]])
    shutil.copyfile(version(share, "support/v1") / "adapter_model.safetensors",
                    version(share, "swapped/v1") / "adapter_model.safetensors")
    try:
        for job, field in ((_job("p-swapped", parent="swapped/v1"), "parent"),
                           (JobSpec(id="m-swapped", kind="merge", merge={"adapters": ["swapped/v1"], "into": "base"}),
                            "merge.adapters")):
            with pytest.raises(Rejected, match=r"swapped/v1 is not what was registered \(adapter_model.safetensors") \
                    as e:
                run(share, job)
            assert e.value.field == field
    finally:
        shutil.rmtree(version(share, "swapped/v1").parent)


@pytest.mark.parametrize(("config", "says"), [
    ({"peft_type": "IA3", "r": 4, "target_modules": ["q_proj"]}, "peft_type is 'IA3', not LORA"),
    ({"peft_type": "LORA", "r": "four", "target_modules": ["q_proj"]}, "r is 'four'"),
    ({"peft_type": "LORA", "r": 4, "target_modules": []}, "target_modules is []"),
    ([1, 2], "not a JSON object"),
    ("deep", "does not parse (RecursionError)"),
])
def test_a_lora_config_peft_would_misread_is_named(tmp_path: Path, config: Any, says: str) -> None:
    """A config forged to match its manifest still has to be a LoRA config: another peft_type dropped the adapter
    from a merge without a word, and the rest failed inside peft (audit, proven)."""
    from worker.modelguard import lora_config_problem

    text = "[" * 100_000 + "]" * 100_000 if config == "deep" else json.dumps(config)
    (tmp_path / "adapter_config.json").write_text(text)
    assert says in (lora_config_problem(tmp_path) or ""), lora_config_problem(tmp_path)


def test_a_config_nested_past_the_recursion_limit_fails_verification(share: Share, trained: dict,
                                                                     tmp_path: Path) -> None:
    folder = copy_of(share, "support/v1", tmp_path)
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    report = verify_folder(share, folder)
    assert not report.ok and "RecursionError" in check(report, "load").reason


# ── verification: a good adapter, and each corruption caught for its reason ──────────────────────────────
def test_a_registered_adapter_passes_every_check(share: Share, trained: dict) -> None:
    from worker.adapter_verify import registered_target, verify

    report = verify(registered_target(share, "support/v3", dataset=[share.root / "datasets" / "alpaca.jsonl"]))
    assert report.ok, report
    assert [(c.name, c.status) for c in report.checks] == [(n, CheckStatus.passed) for n in
                                                           ("files", "safetensors", "keys", "base-identity", "load",
                                                            "eval")]
    assert "the manifest says" in check(report, "eval").reason and "training eval split" in check(report,
                                                                                                  "eval").reason


def test_a_plain_peft_folder_skips_only_the_manifest_checks(share: Share, trained: dict) -> None:
    """An adapter made elsewhere: no manifest, the base from its adapter_config.json."""
    report = verify_folder(share, trained["s1"].adapter_dir)  # the attempt's own folder: no manifest in it
    assert report.ok and report.base == "models/tiny"
    skipped = {c.name for c in report.checks if c.status is CheckStatus.skipped}
    assert skipped == {"files", "base-identity", "eval"}
    assert "no manifest.json" in check(report, "files").reason


def test_a_flipped_byte_fails_the_hashes(share: Share, trained: dict, tmp_path: Path) -> None:
    folder = copy_of(share, "support/v1", tmp_path)
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))
    report = verify_folder(share, folder)
    assert not report.ok
    files = check(report, "files")
    assert files.status is CheckStatus.failed
    assert "adapter_model.safetensors has a different sha256 than the manifest" in files.reason


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": [4], "data_offsets": 7},
                                   {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
                                   {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}],
                         ids=["offsets-int", "dtype-list", "shape-int"])
def test_a_header_entry_of_the_wrong_json_type_is_a_failed_check(share: Share, trained: dict, tmp_path: Path,
                                                                 entry: dict) -> None:
    """A hostile header (an integer where a pair belongs, a list for a dtype) is reported, never raised."""
    folder = copy_of(share, "support/v1", tmp_path)
    header = json.dumps({"x": entry}).encode()
    (folder / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    safe = check(verify_folder(share, folder), "safetensors")
    assert safe.status is CheckStatus.failed and "x: malformed header entry" in safe.reason, safe.reason


def test_a_zeroed_lora_b_is_an_adapter_that_never_trained(share: Share, trained: dict, tmp_path: Path) -> None:
    folder = copy_of(share, "support/v1", tmp_path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    rewrite_tensors(folder, lambda t: t.__setitem__(key, t[key] * 0))
    report = verify_folder(share, folder)
    safe = check(report, "safetensors")
    assert safe.status is CheckStatus.failed
    assert f"{key} is all zeros: this adapter was never trained" in safe.reason


def test_a_renamed_key_maps_to_no_module(share: Share, trained: dict, tmp_path: Path) -> None:
    folder = copy_of(share, "support/v1", tmp_path)
    old = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    new = old.replace("q_proj", "qq_proj")
    rewrite_tensors(folder, lambda t: t.__setitem__(new, t.pop(old)))
    report = verify_folder(share, folder)
    keys = check(report, "keys")
    assert keys.status is CheckStatus.failed
    assert "the base model has no module 'model.layers.0.self_attn.qq_proj'" in keys.reason
    assert "model.layers.0.self_attn.q_proj: has lora_B but no lora_A" in keys.reason


def test_peft_missing_keys_are_a_failure(share: Share, trained: dict, tmp_path: Path) -> None:
    folder = copy_of(share, "support/v1", tmp_path)
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"

    def drop(t: dict) -> None:
        del t[f"{prefix}.lora_A.weight"], t[f"{prefix}.lora_B.weight"]

    rewrite_tensors(folder, drop)
    keys = check(verify_folder(share, folder), "keys")
    assert keys.status is CheckStatus.failed
    assert "model.layers.1.self_attn.q_proj: targeted by adapter_config.json but has no adapter weights" in keys.reason
    assert "peft: Found missing adapter keys" in keys.reason or "(and" in keys.reason


def test_a_wrong_shape_is_named(share: Share, trained: dict, tmp_path: Path) -> None:
    import torch

    folder = copy_of(share, "support/v1", tmp_path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    rewrite_tensors(folder, lambda t: t.__setitem__(key, torch.ones(4, 32)))
    report = verify_folder(share, folder)
    assert "lora_A.weight: shape [4, 32] does not fit the base's layer (expects ['r', 64])" in \
        check(report, "keys").reason
    assert check(report, "load").status is CheckStatus.failed  # peft refuses the size mismatch too


def test_another_base_of_the_same_shape_is_caught_by_identity(share: Share, trained: dict) -> None:
    """Loads and runs without a complaint: only the hash says it is the wrong base."""
    from worker.adapter_verify import registered_target, verify

    report = verify(registered_target(share, "support/v1", base=share.root / "models" / "tiny-other"))
    assert not report.ok
    ident = check(report, "base-identity")
    assert ident.status is CheckStatus.failed
    assert "is not the base it was trained on (models/tiny)" in ident.reason and "model.safetensors" in ident.reason
    assert check(report, "load").status is CheckStatus.passed and check(report, "keys").status is CheckStatus.passed


class _Planted:
    """A pickle that runs code when loaded: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_a_pickle_file_fails_and_is_never_opened(share: Share, trained: dict, tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"
    folder = copy_of(share, "support/v1", tmp_path)
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"weights": _Planted(marker)}, f)
    report = verify_folder(share, folder)
    safe = check(report, "safetensors")
    assert safe.status is CheckStatus.failed and "adapter_model.bin is a pickle file" in safe.reason
    assert "adapter_model.bin is not in the manifest" in check(report, "files").reason
    (folder / "adapter_model.safetensors").unlink()  # a pickle-only adapter: nothing may be loaded at all
    report = verify_folder(share, folder)
    assert "no *.safetensors file" in check(report, "safetensors").reason
    assert {check(report, n).status for n in ("keys", "load", "eval")} == {CheckStatus.skipped}
    assert not marker.exists(), "a pickle was unpickled"


def test_eval_loss_outside_the_tolerance_fails(share: Share, trained: dict) -> None:
    from worker.adapter_verify import registered_target, verify

    target = registered_target(share, "support/v1", dataset=[share.root / "datasets" / "chat.jsonl"],
                               tolerance=1e-6)
    ev = check(verify(target), "eval")
    assert ev.status is CheckStatus.failed and "the eval split of the given dataset" in ev.reason
    assert "outside" in ev.reason


def test_a_chain_of_three_verifies_on_one_load_of_its_base(share: Share, trained: dict,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The chain's reports are each version's own, checked alone, and its base is read once, not once a version."""
    from worker import engine
    from worker.adapter_verify import registered_target, verify, verify_chain

    alone = {ref: verify(registered_target(share, ref)) for ref in ("support/v1", "support/v2", "support/v3")}
    loads: list[Path] = []
    real_load = engine.load_model
    monkeypatch.setattr(engine, "load_model", lambda folder, plan: loads.append(folder) or real_load(folder, plan))
    chain = verify_chain(share, "support")
    assert chain.ok, chain
    assert [r.target for r in chain.versions] == ["support/v1", "support/v2", "support/v3"]
    assert chain.versions == list(alone.values())
    assert [(c.name, c.status) for c in chain.links] == [("link support/v2 -> support/v1", CheckStatus.passed),
                                                         ("link support/v3 -> support/v2", CheckStatus.passed)]
    assert len(loads) == 1, loads


def test_a_base_that_an_adapter_changed_is_not_kept(share: Share, trained: dict, tmp_path: Path) -> None:
    """modules_to_save: unloading gives back the adapter's trained copy of lm_head, not the base's. The next
    adapter must get a fresh base, with the logits a base read from disk gives."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from schemas.job import Quantization
    from worker.adapter_verify import Bases
    from worker.engine import load_model, plan_for

    base_dir = share.root / "models" / "tiny"
    plan = plan_for(Quantization.none, "cpu")
    wrapped = get_peft_model(load_model(base_dir, plan), LoraConfig(r=4, target_modules=["q_proj"],
                                                                    modules_to_save=["lm_head"]))
    with torch.no_grad():
        wrapped.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    wrapped.save_pretrained(tmp_path / "with-head")
    ids = torch.tensor([[1, 5, 9, 13]])
    want = load_model(base_dir, plan)(input_ids=ids).logits
    bases = Bases()
    first = bases.take(base_dir, "cpu")
    bases.give_back(PeftModel.from_pretrained(first, str(tmp_path / "with-head")))
    second = bases.take(base_dir, "cpu")
    assert second is not first and torch.equal(second(input_ids=ids).logits, want)
    bases.give_back(PeftModel.from_pretrained(second, str(trained["s1"].adapter_dir)))
    third = bases.take(base_dir, "cpu")
    assert third is second and torch.equal(third(input_ids=ids).logits, want)


def test_verify_cli_exit_status_and_json(share: Share, trained: dict, tmp_path: Path) -> None:
    folder = copy_of(share, "support/v2", tmp_path)
    rewrite_tensors(folder, lambda t: t.__setitem__(next(iter(t)), t[next(iter(t))] * 0))
    good = _cli("verify", "support/v2", "--share", str(share.root), "--json")
    bad = _cli("verify", str(folder), "--share", str(share.root))
    assert good.returncode == 0, good.stderr
    assert VerifyReport.model_validate_json(good.stdout).ok
    assert bad.returncode == 1 and "FAIL files" in bad.stdout and "FAILED" in bad.stdout
    # Share paths, from a current folder that is not the share (README's examples are share paths).
    rel = str(version(share, "support/v2").relative_to(share.root))
    assert not Path(rel).exists() and not Path("models/tiny").exists()
    here = _cli("verify", rel, "--base", "models/tiny", "--dataset", "datasets/alpaca.jsonl", "--share",
                str(share.root), "--json")
    assert here.returncode == 0, here.stdout + here.stderr
    assert {c["name"] for c in json.loads(here.stdout)["checks"]} >= {"eval", "load"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spooler.cli", *args], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "LORASPOOL_SHARE": ""})


# ── compatibility ────────────────────────────────────────────────────────────────────────────────────────
def _side(share: Share, ref: str, weight: float = 1.0) -> Any:
    from worker.compat import Side

    return Side(ref, version(share, ref), registry.read_manifest(share, registry.Ref.parse(ref)), weight)


def test_compat_rules_and_risk(share: Share, trained: dict) -> None:
    from worker.compat import compat

    same = compat(_side(share, "support/v3"), _side(share, "billing/v1"), "linear")
    assert same.compatible and 40 <= same.risk <= 100 and same.overlap == 1.0
    assert same.cosine is not None and same.norm_ratio is not None and same.reasons
    wide = compat(_side(share, "support/v3"), _side(share, "wide/v1"), "linear")
    assert not wide.compatible and wide.risk == 100
    assert {c.name for c in wide.checks if c.status is CheckStatus.failed} == {"rank", "target-modules"}
    cat = compat(_side(share, "support/v3"), _side(share, "wide/v1"), "cat")
    assert cat.compatible and cat.overlap == 0.5  # q_proj in both layers shared, v_proj only in support
    assert cat.risk < same.risk
    opposed = compat(_side(share, "support/v3"), _side(share, "support/v3", -1.0), "cat")
    assert opposed.cosine == pytest.approx(-1.0) and opposed.risk == 70 and "opposed" in " ".join(opposed.reasons)


# ── merging ──────────────────────────────────────────────────────────────────────────────────────────────
def test_merge_into_base_equals_adapter_on_base(share: Share, trained: dict) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = registry.read_manifest(share, registry.Ref("support", 3))
    base = share.root / "models" / "tiny"
    extra = {"additional_chat_templates/tool_use.jinja": "{{ tools }}", "LICENSE": "terms", "modeling_x.py": "",
             "pytorch_model.bin": "pickle"}  # a named template and the licence go with it; code and pickles do not
    (base / "additional_chat_templates").mkdir()
    for name, text in extra.items():
        (base / name).write_text(text)
    try:
        outcome = run(share, JobSpec(id="m-base", kind="merge", merge={"adapters": ["support/v3"], "into": "base"}))
    finally:
        shutil.rmtree(base / "additional_chat_templates")
        for name in list(extra)[1:]:
            (base / name).unlink()
    assert outcome.ok and outcome.merged_model == "models/merged/support-v3"
    out = share.root / outcome.merged_model
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"
    assert (out / "LICENSE").read_text() == "terms"
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert not (out / "modeling_x.py").exists() and not (out / "pytorch_model.bin").exists()
    record = read_model(out / MANIFEST, MergedModel)
    assert record is not None and record.adapter == "support/v3" and record.max_logit_diff <= record.tolerance
    assert any(n.endswith(".safetensors") for n in record.files) and not list(out.glob("*.bin"))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        base_model = AutoModelForCausalLM.from_pretrained(base)
        adapted = PeftModel.from_pretrained(base_model, version(share, "support/v3"))(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    assert torch.allclose(adapted, merged, atol=1e-4), float((adapted - merged).abs().max())
    assert registry.read_manifest(share, registry.Ref("support", 3)) == before  # the input is untouched
    with pytest.raises(Rejected, match="'models/merged/support-v3' already exists; a merge never replaces") as e:
        run(share, JobSpec(id="m-base-2", kind="merge", merge={"adapters": ["support/v3"], "into": "base"}))
    assert e.value.field == "merge.output"
    again = run(share, JobSpec(id="m-base", kind="merge", merge={"adapters": ["support/v3"], "into": "base"}))
    assert again.ok and again.merged_model == outcome.merged_model  # requeued after it merged: no second merge
    _a_planted_manifest_is_no_earlier_merge(share, out, record)
    _merged_models_are_listed(share, record)


def test_a_qlora_adapter_verifies_and_merges_on_the_unquantized_base(share: Share) -> None:
    """Trained on an nf4 base (bitsandbytes' CPU kernels stand in for the GPU's), checked and merged on the full
    base, as a team does with a QLoRA adapter: the eval check must allow for the quantization it was trained on."""
    import dataclasses

    pytest.importorskip("bitsandbytes")
    from worker.adapter_verify import registered_target, verify

    job = _job("q1", register_as="qlora", quantization="4bit")
    outcome = run_training(dataclasses.replace(_request(share, job), cpu_quantization="bitsandbytes"),
                           lambda _p: None, lambda: False)
    assert outcome.registered == "qlora/v1" and outcome.quantization == "4bit"
    manifest = registry.read_manifest(share, registry.Ref("qlora", 1))
    assert manifest is not None and manifest.lora.quantization == "4bit"
    report = verify(registered_target(share, "qlora/v1", dataset=[share.root / "datasets" / "alpaca.jsonl"]))
    assert report.ok, report
    assert "trained and measured on a 4bit base" in check(report, "eval").reason
    merged = run(share, JobSpec(id="m-qlora", kind="merge", merge={"adapters": ["qlora/v1"], "into": "base"}))
    assert merged.ok and merged.merged_model == "models/merged/qlora-v1"
    assert any("4bit-quantized base (QLoRA)" in n for n in merged.notes), merged.notes


def _a_planted_manifest_is_no_earlier_merge(share: Share, out: Path, record: MergedModel) -> None:
    """A folder whose manifest.json names a job that has not run yet (anyone can write one) is not that job's
    earlier merge: with weights added, or for another adapter, the job is refused, never 'succeeded' on them."""
    planted = share.root / "models" / "planted"
    for change in ("weights", "adapter"):
        shutil.copytree(out, planted)
        fake = record.model_copy(update={"job_id": "u-plant"})
        if change == "weights":
            (planted / "BACKDOOR.safetensors").write_bytes(b"x")
        else:
            fake.adapter = "billing/v1"
        (planted / MANIFEST).write_text(fake.model_dump_json())
        try:
            with pytest.raises(Rejected, match="already exists and is not this job's earlier merge") as e:
                run(share, JobSpec(id="u-plant", kind="merge", merge={"adapters": ["support/v3"], "into": "base",
                                                                      "output": "models/planted"}))
            assert e.value.field == "merge.output"
        finally:
            shutil.rmtree(planted)


def _merged_models_are_listed(share: Share, record: MergedModel) -> None:
    """``loraspool adapters`` lists the merged folder under models/, and nothing that only looks like one: a merge
    still being written (hidden), a link to the folder, a manifest of another kind, one too deep to look for."""
    merged = share.root / "models" / "merged"
    shutil.copytree(merged / "support-v3", merged / ".support-v4.0123abcd.tmp")
    (share.root / "models" / "linked").symlink_to(merged / "support-v3", target_is_directory=True)
    (share.root / "models" / "other").mkdir()
    (share.root / "models" / "other" / MANIFEST).write_text('{"not": "a merged model"}')
    deep = share.root / "models" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    shutil.copy2(merged / "support-v3" / MANIFEST, deep / MANIFEST)
    try:
        listed = [m for m in registry.listing(share).merged if m.adapter == "support/v3"]
        assert [(m.path, m.base, m.size_bytes, m.job_id) for m in listed] == \
            [("models/merged/support-v3", "models/tiny", record.size_bytes, "m-base")]
        text = _cli("adapters", "--share", str(share.root)).stdout
        assert "merged models:\n  models/merged/support-v3  " in text and "support/v3 merged into models/tiny" in text
    finally:
        shutil.rmtree(merged / ".support-v4.0123abcd.tmp")
        shutil.rmtree(share.root / "models" / "a")
        (share.root / "models" / "linked").unlink()
        shutil.rmtree(share.root / "models" / "other")


@pytest.mark.parametrize("combination", ["linear", "dare_linear", "cat"])
def test_weighted_merge_loads_and_runs(share: Share, trained: dict, combination: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = JobSpec(id=f"mix-{combination}", kind="merge", register_as=f"mix-{combination}",
                  merge={"adapters": ["support/v3", "billing/v1"], "into": "adapter", "combination": combination,
                         "weights": [0.7, 0.3]})
    outcome = run(share, job)
    assert outcome.ok, outcome.error
    assert outcome.registered == f"mix-{combination}/v1" and outcome.verify is not None and outcome.verify.ok
    m = registry.read_manifest(share, registry.Ref.parse(outcome.registered))
    assert m is not None and m.origin == "merge" and m.parents == ["support/v3", "billing/v1"]
    assert m.merge is not None and (m.merge.combination, m.merge.weights) == (combination, [0.7, 0.3])
    assert m.lora.r == (8 if combination == "cat" else 4)
    ids = torch.tensor([[1, 40, 41, 42]])
    base = AutoModelForCausalLM.from_pretrained(share.root / "models" / "tiny")
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        mixed = PeftModel.from_pretrained(base, version(share, outcome.registered))(input_ids=ids).logits
    assert torch.isfinite(mixed).all() and not torch.allclose(plain, mixed)
    if combination == "linear":
        assert run(share, job).registered == outcome.registered  # requeued after it registered: no second version
        _a_planted_version_is_no_earlier_merge(share, job, outcome.registered)


def _a_planted_version_is_no_earlier_merge(share: Share, job: JobSpec, registered: str) -> None:
    """A version whose manifest names a merge job that has not run yet, with a file added: the job is refused,
    never 'succeeded' on it."""
    planted = registry.root(share) / "mix-planted" / "v1"
    shutil.copytree(version(share, registered), planted)
    m = registry.read_manifest(share, registry.Ref.parse(registered))
    assert m is not None
    (planted / registry.MANIFEST).write_text(m.model_copy(update={"job_id": "u-mix", "name": "mix-planted"})
                                              .model_dump_json())
    (planted / "extra.safetensors").write_bytes(b"x")
    try:
        with pytest.raises(Rejected, match="names this job but is not its earlier merge") as e:
            run(share, job.model_copy(update={"id": "u-mix", "register_as": "mix-planted"}))
        assert e.value.field == "merge"
    finally:
        shutil.rmtree(planted.parent)


def test_a_merge_of_incompatible_ranks_is_rejected(share: Share, trained: dict) -> None:
    job = JobSpec(id="mix-bad", kind="merge", merge={"adapters": ["support/v3", "wide/v1"], "into": "adapter",
                                                     "combination": "linear"})
    with pytest.raises(Rejected, match="peft refuses linear") as e:
        run(share, job)
    assert e.value.field == "merge.combination"


# ── verify and merge jobs: results ───────────────────────────────────────────────────────────────────────
def test_verify_jobs_report_every_check_in_the_result(share: Share, trained: dict) -> None:
    base = Result(id="v", status=Terminal.failed)
    good = run(share, JobSpec(id="v-good", kind="verify", verify={"chain": "support"}))
    assert good.result(base).status is Terminal.succeeded and good.result(base).verify_chain.ok
    other = run(share, JobSpec(id="v-other", kind="verify", base_model="models/tiny-other",
                               verify={"adapter": "support/v1"}))
    result = other.result(base)
    assert result.status is Terminal.failed and result.error.startswith("verification failed: base-identity:")
    assert result.verify is not None and check(result.verify, "base-identity").status is CheckStatus.failed
    folder = share.rel(trained["s1"].adapter_dir)
    plain = run(share, JobSpec(id="v-plain", kind="verify", verify={"adapter": folder}))
    assert plain.ok and check(plain.verify, "files").status is CheckStatus.skipped


@pytest.mark.parametrize(("job", "field", "problem"), [
    ({"kind": "verify"}, "verify", "is required for a verify job"),
    ({"kind": "verify", "verify": {"adapter": "../x"}}, "verify.adapter", "'..' component"),
    ({"kind": "verify", "verify": {"adapter": "a/v1", "chain": "a"}}, "verify", "exactly one of"),
    ({"kind": "train", "base_model": "m", "dataset": "d", "parent": "support"}, "parent", "not NAME/VERSION"),
    ({"kind": "probe", "parent": "support/v1"}, "parent", "only a train job"),
    ({"kind": "train", "base_model": "m", "dataset": "d", "register_as": "a b"}, "register_as", "not a safe"),
    ({"kind": "merge", "merge": {"adapters": ["a/v1", "b/v1"], "into": "base"}}, "merge", "exactly one adapter"),
    ({"kind": "merge", "merge": {"adapters": ["a/v1", "b/v1"], "into": "adapter", "weights": [1]}}, "merge",
     "weights has 1 entries for 2 adapters"),
    ({"kind": "merge", "merge": {"adapters": ["a/v1", "b/v1"], "into": "adapter", "combination": "tie"}},
     "merge.combination", "'tie'"),
    ({"kind": "merge", "merge": {"adapters": ["a/v1"], "into": "base", "output": "/abs"}}, "merge.output",
     "absolute"),
    ({"kind": "train", "base_model": "m", "dataset": "d", "verify": {"adapter": "a/v1"}}, "verify",
     "is for kind \"verify\""),
])
def test_bad_adapter_job_fields_are_rejected_by_name(job: dict, field: str, problem: str) -> None:
    with pytest.raises(Rejected) as e:
        parse_spec(json.dumps(job).encode(), "j.json", 10**6)
    assert e.value.field == field and problem in e.value.problem, str(e.value)


# ── listing, sizes and retention ─────────────────────────────────────────────────────────────────────────
def test_the_listing_is_a_tree_with_sizes_losses_and_levels(share: Share, trained: dict) -> None:
    tree = registry.listing(share)
    base = next(b for b in tree.bases if b.path == "models/tiny")
    v1 = next(n for n in base.versions if n.ref == "support/v1")
    v2 = v1.children[0]
    v3 = v2.children[0]
    assert [v2.ref, v3.ref] == ["support/v2", "support/v3"]
    sizes = {r: registry.read_manifest(share, registry.Ref.parse(r)).size_bytes  # type: ignore[union-attr]
             for r in ("support/v1", "support/v2", "support/v3")}
    assert v3.size_bytes == sizes["support/v3"]
    assert v3.chain_bytes == base.size_bytes + sum(sizes.values())
    assert v3.eval_loss == trained["s3"].metrics.eval_loss_after and v3.level.value == "optimal"
    gb = 1e9
    small = Share(share.root, share.settings.model_copy(update={
        "size_plan_gb": (base.size_bytes + 1) / gb, "size_merge_gb": v2.chain_bytes / gb,
        "size_critical_gb": v3.chain_bytes / gb}))
    levels = {n.ref: n for n in _walk(registry.listing(small))}
    assert [levels[r].level.value for r in ("support/v1", "support/v2", "support/v3")] == \
        ["consider planning", "merge recommended", "critical"]
    assert "loraspool merge support/v3 --into base" in " ".join(levels["support/v3"].warnings)
    text = _cli("adapters", "--share", str(share.root))
    assert text.returncode == 0 and "models/tiny  (base" in text.stdout and "└── support/v2" in text.stdout


def _walk(tree: Any) -> list[Any]:
    out, pending = [], [n for b in tree.bases for n in b.versions]
    while pending:
        node = pending.pop()
        out.append(node)
        pending.extend(node.children)
    return out


def test_gc_never_removes_a_newest_version_or_a_parent(share: Share, trained: dict) -> None:
    """scratch/v1, v2 stand alone; v3 descends from v2. Only v1 can go, and only when a person names it."""
    _register_copies(share, trained, "scratch", [[], [], ["scratch/v2"]])
    report = registry.gc(share)
    assert "scratch/v1" in report.removable and report.removed == []
    for ref in ("scratch/v2", "scratch/v3", "support/v1", "support/v2", "support/v3"):
        assert ref not in report.removable and ref in report.kept
    assert report.kept["scratch/v2"] == "an ancestor of scratch/v3, which stays"
    assert report.kept["scratch/v3"] == "the newest version of scratch"
    assert version(share, "scratch/v1").is_dir(), "gc without --apply removed something"
    cli = _cli("gc", "--share", str(share.root), "--apply", "scratch/v1", "scratch/v2", "scratch/v3", "support/v1",
               "nope/v1", "--json")
    applied = json.loads(cli.stdout)
    assert cli.returncode == 1 and applied["removed"] == ["scratch/v1"]
    assert set(applied["refused"]) == {"scratch/v2", "scratch/v3", "support/v1", "nope/v1"}
    assert applied["refused"]["support/v1"].startswith("kept: an ancestor of ")
    assert registry.numbers(share, "scratch") == [2, 3] and registry.numbers(share, "support") == [1, 2, 3]
    assert not [p for p in (registry.root(share) / "scratch").iterdir() if p.name.startswith(".")]


def _register_copies(share: Share, trained: dict, name: str, parents: list[list[str]]) -> None:
    """Register billing/v1's adapter again as NAME/v1, v2, ..., one version per entry, with those parents."""
    source = trained["b1"].adapter_dir
    template = registry.read_manifest(share, registry.Ref("billing", 1))
    assert template is not None
    for n, up in enumerate(parents, 1):
        m = template.model_copy(update={"job_id": f"{name}-{n}", "token": f"{name}{n}", "parents": up})
        assert str(registry.register(share, name, source, m)) == f"{name}/v{n}"


def _enqueue(share: Share, job: dict) -> Path:
    """Drop a job and accept it the way a worker's intake does; returns its file in queue/."""
    job_id = Intake(share, "w-gc", SystemClock()).take(drop(share, f"{job['id']}.json", job))
    return next(path for key, path in claim.queued(share) if key.job_id == job_id)


def test_gc_keeps_the_versions_unfinished_jobs_name(share: Share, trained: dict) -> None:
    """pinned/v1 <- v2; v3, v4 stand alone. A queued train job continues from v2, a claimed merge job and a verify
    job still in the inbox read v3: gc --apply removes none of them, nor v2's parent, and says why."""
    _register_copies(share, trained, "pinned", [[], ["pinned/v1"], [], []])
    _enqueue(share, {**train_job("gc-train", steps=4), "parent": "pinned/v2"})
    _enqueue(share, {"id": "gc-merge", "kind": "merge",
                     "merge": {"adapters": ["pinned/v3", "billing/v1"], "into": "adapter"}})
    assert claim.next_job(share, "w-gc", only="gc-merge") is not None  # claimed, as a worker claims it
    drop(share, "gc-verify.json", {"id": "gc-verify", "kind": "verify", "verify": {"adapter": "pinned/v3"}})
    report = registry.gc(share, ["pinned/v1", "pinned/v2", "pinned/v3"])
    assert report.removed == [] and registry.numbers(share, "pinned") == [1, 2, 3, 4]
    assert report.refused == {
        "pinned/v1": "kept: an ancestor of pinned/v2, which stays",
        "pinned/v2": "kept: named by job gc-train (queued)",
        "pinned/v3": "kept: named by job gc-verify (incoming), job gc-merge (running on w-gc)"}
    cli = _cli("gc", "--share", str(share.root), "--apply", "pinned/v2")
    assert cli.returncode == 1 and "refused pinned/v2: kept: named by job gc-train (queued)" in cli.stdout
    assert registry.numbers(share, "pinned") == [1, 2, 3, 4]


def test_gc_keeps_a_version_a_verify_job_names_by_its_folder_or_its_chain(share: Share, trained: dict) -> None:
    """verify.adapter may be a version's folder, and verify.chain reads every version of a name: gc counted
    only NAME/VERSION, and removed what those queued jobs would load (audit, proven)."""
    _register_copies(share, trained, "byfolder", [[], []])
    _register_copies(share, trained, "bychain", [[], []])
    _enqueue(share, {"id": "gc-folder", "kind": "verify", "verify": {"adapter": "adapters\\byfolder\\v1\\"}})
    _enqueue(share, {"id": "gc-chain", "kind": "verify", "verify": {"chain": "bychain"}})
    report = registry.gc(share, ["byfolder/v1", "bychain/v1"])
    assert report.removed == [] and report.refused == {
        "byfolder/v1": "kept: named by job gc-folder (queued)", "bychain/v1": "kept: named by job gc-chain (queued)"}


def test_gc_removes_a_version_once_the_job_naming_it_has_finished(share: Share, trained: dict) -> None:
    from spooler.cancel import request_cancel

    _register_copies(share, trained, "done", [[], []])
    _enqueue(share, {**train_job("gc-done", steps=4), "parent": "done/v1"})
    assert registry.gc(share, ["done/v1"]).refused == {"done/v1": "kept: named by job gc-done (queued)"}
    assert request_cancel(share, "gc-done", SystemClock()) == "job gc-done cancelled"
    assert result_of(share, "gc-done").status is Terminal.cancelled  # type: ignore[union-attr]
    report = registry.gc(share, ["done/v1"])
    assert report.removed == ["done/v1"] and report.refused == {} and registry.numbers(share, "done") == [2]


def test_gc_removes_nothing_through_a_top_folder_linked_out_of_the_share(tmp_path: Path) -> None:
    """gc's start-up pass finishes removals an earlier run decided: folders named like its own, under models/.
    With models/ a link out of the share it deleted such folders out there (audit, suspected; shown here)."""
    root = tmp_path / "share"
    other = make_share(root)
    elsewhere = tmp_path / "elsewhere"
    victim = elsewhere / "merged" / ".gc-x-0123abcd.deleting.tmp"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("someone's file")
    shutil.rmtree(other.root / "models", ignore_errors=True)
    (other.root / "models").symlink_to(elsewhere, target_is_directory=True)
    registry.gc(other)
    assert (victim / "keep.txt").read_text() == "someone's file"


def test_unreadable_job_files_do_not_stop_gc(share: Share, trained: dict) -> None:
    """Garbage, cut-short and invalid job files, a folder and a dangling link where job files lie: gc reads past
    each. None that could still be arriving mentions junk/v1, and queue/ and running/ are written whole by the
    spool, so junk/v1 still goes."""
    _register_copies(share, trained, "junk", [[], []])
    whole = json.dumps({**train_job("gc-junk", steps=4), "parent": "junk/v1"})
    names = [states.QueueKey(0, "20260101000000000", f"gc-junk{n}", 1).name for n in range(5)]
    (share.queue / names[0]).write_bytes(b"\x00\xff{ not json")
    (share.queue / names[1]).write_text(whole[:-1])  # a copy cut short: no closing brace
    (share.queue / names[2]).mkdir()
    (share.queue / names[3]).symlink_to(share.root / "nowhere.json")
    share.makedirs(share.running("w-junk"))
    (share.running("w-junk") / names[4]).write_text(whole.replace('"parent"', '"paernt": 1, "parent"'))
    drop(share, "gc-junk.json", whole[:30].encode())
    share.makedirs(share.intake("w-junk"))
    (share.intake("w-junk") / "0123456789ab__gc-junk.json").write_bytes(b"[" * 100 + b"junk/v10 xjunk/v1")
    report = registry.gc(share, ["junk/v1"])
    assert report.removed == ["junk/v1"] and report.refused == {} and registry.numbers(share, "junk") == [2]
    assert not any("gc-junk" in why for why in report.kept.values())


def test_a_job_file_still_being_copied_keeps_the_versions_its_text_names(share: Share, trained: dict) -> None:
    """Copies arrive in pieces: an inbox file cut short does not parse yet, but the text it has names copy/v1,
    so gc keeps copy/v1 (and not copy/v2, which no file names) until intake has read the whole job."""
    _register_copies(share, trained, "copy", [[], [], []])
    whole = json.dumps({**train_job("gc-copy", steps=4), "parent": "Copy/v1"})
    drop(share, "gc-copy.json", whole[:-2].encode())  # ends in the middle of "Copy/v1"}
    report = registry.gc(share, ["copy/v1", "copy/v2"])
    assert report.removed == ["copy/v2"] and registry.numbers(share, "copy") == [1, 3]
    assert report.refused == {"copy/v1": "kept: named by gc-copy.json, a job file that cannot be read yet "
                                         "(incoming)"}


def test_a_job_that_lands_while_gc_runs_keeps_its_versions(share: Share, trained: dict,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """gc takes no lock a submitter honours. A job naming late/v2 lands right after gc has looked at the jobs
    (dropped from inside that first look): gc hides late/v1 and v2, looks again, and puts back v2 and its parent
    v1, each the same folder as before; an unnamed late/v3 still goes."""
    _register_copies(share, trained, "late", [[], ["late/v1"], [], []])
    before = {r: _tree_digest(version(share, r)) for r in ("late/v1", "late/v2")}
    first_look = registry._named_by_jobs
    looks: list[int] = []

    def look_then_submit(s: Share, all_refs: list) -> dict[str, str]:
        found = first_look(s, all_refs)
        if not looks:
            drop(share, "gc-late.json", {**train_job("gc-late", steps=4), "parent": "late/v2"})
        looks.append(1)
        return found

    monkeypatch.setattr(registry, "_named_by_jobs", look_then_submit)
    report = registry.gc(share, ["late/v1", "late/v2", "late/v3"])
    assert len(looks) == 2 and report.removed == ["late/v3"] and registry.numbers(share, "late") == [1, 2, 4]
    assert report.refused == {
        "late/v1": "kept: an ancestor of late/v2, which stays (it came while gc ran)",
        "late/v2": "kept: named by job gc-late (incoming) (it came while gc ran)"}
    assert {r: _tree_digest(version(share, r)) for r in before} == before
    assert not [p for p in (registry.root(share) / "late").iterdir() if p.name.startswith(".")]


def test_gc_removes_none_when_one_cannot_be_moved_aside(share: Share, trained: dict,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """All or none: roll/v1 <- v2, both asked for, and v2 cannot be moved aside (on Windows or SMB a file in it is
    open). Had v1 gone while v2 stayed, v2 would have lost its parent. gc puts v1 back, the same folder."""
    _register_copies(share, trained, "roll", [[], ["roll/v1"], []])
    before = {r: _tree_digest(version(share, r)) for r in ("roll/v1", "roll/v2")}
    hide = registry._hide

    def in_use_on_v2(doomed: registry.Doomed) -> Path:
        if doomed.key == "roll/v2":
            raise PermissionError(13, "The process cannot access the file because it is being used", "model")
        return hide(doomed)

    monkeypatch.setattr(registry, "_hide", in_use_on_v2)
    report = registry.gc(share, ["roll/v1", "roll/v2"])
    assert report.removed == [] and registry.numbers(share, "roll") == [1, 2, 3]
    assert report.refused["roll/v1"] == "not removed: roll/v2 could not be moved aside, so nothing was"
    assert report.refused["roll/v2"].startswith("could not be moved aside (PermissionError")
    assert {r: _tree_digest(version(share, r)) for r in before} == before
    assert not [p for p in (registry.root(share) / "roll").iterdir() if p.name.startswith(".")]


def test_gc_puts_back_what_it_hid_when_the_second_look_fails(share: Share, trained: dict,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The share fails between hiding and the second look at the jobs: nothing stays hidden unreported."""
    _register_copies(share, trained, "blip", [[], []])
    before = _tree_digest(version(share, "blip/v1"))
    first_look = registry._named_by_jobs
    looks: list[int] = []

    def fail_second(s: Share, keys: list) -> dict[str, str]:
        looks.append(1)
        if len(looks) == 2:
            raise OSError(5, "Input/output error")
        return first_look(s, keys)

    monkeypatch.setattr(registry, "_named_by_jobs", fail_second)
    report = registry.gc(share, ["blip/v1"])
    assert report.removed == [] and report.refused["blip/v1"].startswith("not removed: the jobs could not be read")
    assert _tree_digest(version(share, "blip/v1")) == before
    assert not [p for p in (registry.root(share) / "blip").iterdir() if p.name.startswith(".")]


def test_a_version_an_interrupted_gc_hid_is_named_and_a_decided_removal_finished(share: Share, trained: dict,
                                                                                     tmp_path: Path) -> None:
    """Found by kill -9 of gc --apply between hiding a version and its second look: the version stayed hidden for
    good, unregistered to every job (a job naming it was rejected) and unmentioned by gc or adapters. The next
    gc names it with the command that puts it back (not putting it back itself: a gc running now may be
    deciding on it, all or none); one stopped after it decided (mid-removal) is finished."""
    _register_copies(share, trained, "hid", [[], []])
    before = _tree_digest(version(share, "hid/v1"))
    hidden = registry._hide(registry.Doomed("hid/v1", version(share, "hid/v1"), 0, "adapter"))  # then killed
    deciding = registry._hide(registry.Doomed("hid/v2", version(share, "hid/v2"), 0, "adapter"))
    deleting = deciding.with_name(deciding.name.removesuffix(".tmp") + ".deleting.tmp")
    os.rename(deciding, deleting)  # killed in the rmtree that follows
    assert registry.Ref("hid", 1) not in registry.refs(share)
    out = _cli("gc", "--share", str(share.root))
    assert f"refused {hidden.relative_to(share.root).as_posix()}: hidden by a gc that was stopped before it " \
           f"decided" in out.stdout, out.stdout
    assert f"mv '{hidden}' '{version(share, 'hid/v1')}'" in out.stdout and out.returncode == 1
    assert f"finished removing {deleting.relative_to(share.root).as_posix()}" in out.stdout, out.stdout
    assert not deleting.exists() and not version(share, "hid/v2").exists()
    os.rename(hidden, version(share, "hid/v1"))  # what the message says to type
    assert _tree_digest(version(share, "hid/v1")) == before


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folders_the_workers_made_are_writable_by_the_shares_group(share: Share, trained: dict) -> None:
    """adapters/, adapters/<name>/ and datasets/.tokens/ came out 0755 under a 022 umask, only the last folder
    of a mkdir -p having been chmod-ed: a teammate's fallback worker, another account, could not register or
    cache there. (The workers here inherit pytest's umask; the unit test below sets one.)"""
    for folder in (registry.root(share), registry.root(share) / "support", share.root / "datasets" / ".tokens"):
        assert stat.S_IMODE(folder.stat().st_mode) == share.dir_mode, folder


def test_share_makedirs_gives_every_folder_it_makes_the_shares_mode(share: Share) -> None:
    old = os.umask(0o022)
    try:
        made = share.makedirs(share.root / "adapters" / "new" / "deeper")
    finally:
        os.umask(old)
    for folder in (made, made.parent, made.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == share.dir_mode == 0o775, folder
    shutil.rmtree(made.parent)  # adapters/new: not a registered name, and the module's share is shared


def test_gc_removes_the_token_cache_only_when_named(share: Share, trained: dict, tmp_path: Path) -> None:
    """datasets/.tokens is only a cache of tokenized rows, but nothing on the share goes unless a person names it:
    gc reports its size, leaves it when other things are named, and removes it whole when it is named."""
    tokens = share.root / "datasets" / ".tokens"
    size = sum(f.stat().st_size for f in tokens.iterdir())
    assert size and any(tokens.glob("*.safetensors"))  # the train jobs above wrote it
    report = registry.gc(share)
    assert "datasets/.tokens" in report.removable and report.token_cache_bytes == size
    assert "could remove datasets/.tokens (" in _cli("gc", "--share", str(share.root)).stdout
    report = registry.gc(share, ["support/v1"])
    assert report.kept["datasets/.tokens"] == "not named for removal" and tokens.is_dir()
    shutil.copytree(tokens, tmp_path / "tokens")
    datasets = _tree_digest(share.root / "datasets")
    try:
        applied = json.loads(_cli("gc", "--share", str(share.root), "--apply", "datasets/.tokens/", "--json").stdout)
        assert applied["removed"] == ["datasets/.tokens/"] and applied["freed_bytes"] == size
        assert not tokens.exists() and [p.name for p in (share.root / "datasets").iterdir() if p.name[0] == "."] == []
        assert _tree_digest(share.root / "datasets") == {k: v for k, v in datasets.items()
                                                         if not k.startswith(".tokens")}  # the datasets stay
    finally:
        shutil.rmtree(tokens, ignore_errors=True)
        shutil.copytree(tmp_path / "tokens", tokens)  # the module's later tests find the cache as it was


def test_gc_removes_a_merged_model_only_when_named_and_no_job_trains_on_it(share: Share, trained: dict) -> None:
    """A merged model is listed as removable, but stays while a queued job trains on it (base_model, written with
    another case and a trailing slash), and goes once a person names it and the job is gone."""
    from spooler.cancel import request_cancel

    merged = share.root / "models" / "merged"
    if not (merged / "support-v3").is_dir():  # made by test_merge_into_base_equals_adapter_on_base, when it ran
        assert run(share, JobSpec(id="m-base", kind="merge", merge={"adapters": ["support/v3"], "into": "base"})).ok
    shutil.copytree(merged / "support-v3", merged / "gc-copy")
    path = "models/merged/gc-copy"
    assert path in registry.gc(share).removable
    _enqueue(share, {**train_job("gc-on-merged", steps=4), "base_model": "Models/Merged/gc-copy/"})
    report = registry.gc(share, [path, "models/merged/nothing"])
    assert report.removed == [] and (merged / "gc-copy").is_dir()
    assert report.refused[path] == "kept: named by job gc-on-merged (queued)"
    assert "neither NAME/VERSION" in report.refused["models/merged/nothing"]
    assert request_cancel(share, "gc-on-merged", SystemClock()) == "job gc-on-merged cancelled"
    # Written on Windows, as the worker's resolve_in_share would still load it: backslashes and a '.' part.
    _enqueue(share, {**train_job("gc-on-merged-win", steps=4), "base_model": "models\\merged\\.\\gc-copy"})
    assert registry.gc(share, [path]).refused[path] == "kept: named by job gc-on-merged-win (queued)"
    assert request_cancel(share, "gc-on-merged-win", SystemClock()) == "job gc-on-merged-win cancelled"
    # The same job still arriving in pieces: its JSON text so far spells the path with escaped backslashes.
    whole = json.dumps({**train_job("gc-half-win", steps=4), "base_model": "models\\merged\\.\\gc-copy"})
    drop(share, "gc-half-win.json", whole[:whole.index("gc-copy") + 8].encode())
    assert "\\\\merged" in (share.inbox / "gc-half-win.json").read_text()
    assert registry.gc(share, [path]).refused[path] == ("kept: named by gc-half-win.json, a job file that cannot "
                                                        "be read yet (incoming)")
    (share.inbox / "gc-half-win.json").unlink()
    size = next(m.size_bytes for m in registry.merged_models(share) if m.path == path)
    cli = _cli("gc", "--share", str(share.root), "--apply", path + "/", "--json")
    applied = json.loads(cli.stdout)
    assert cli.returncode == 0 and applied["removed"] == [path + "/"] and applied["freed_bytes"] == size > 0
    assert not (merged / "gc-copy").exists() and not [p for p in merged.iterdir() if p.name.startswith(".")]
    assert (merged / "support-v3").is_dir()


def test_gc_never_removes_a_merged_model_outside_the_share(tmp_path: Path, share: Share, trained: dict) -> None:
    """models/ itself a link to another disk: the merged model there is listed, but gc --apply refuses it and
    the folder outside the share stays whole."""
    other = make_share(tmp_path / "other")
    merged = share.root / "models" / "merged"
    if not (merged / "support-v3").is_dir():
        assert run(share, JobSpec(id="m-base", kind="merge", merge={"adapters": ["support/v3"], "into": "base"})).ok
    outside = tmp_path / "elsewhere" / "models"
    shutil.copytree(merged / "support-v3", outside / "merged" / "far")
    (other.root / "models").rmdir()
    (other.root / "models").symlink_to(outside, target_is_directory=True)
    assert "models/merged/far" in registry.gc(other).removable
    report = registry.gc(other, ["models/merged/far"])
    assert report.removed == [] and "outside the share" in report.refused["models/merged/far"]
    assert (outside / "merged" / "far" / MANIFEST).is_file()


def test_nothing_is_made_through_a_symlink_leading_out_of_the_share(tmp_path: Path, share: Share,
                                                                   trained: dict) -> None:
    """adapters/<name> or a folder on merge.output's way a link to another disk (or, for merge.output, into the
    spool's own folders): the job is rejected naming the field, and not even an empty folder is made there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (registry.root(share) / "evil-link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(Rejected, match="outside the share") as e:
        registry.stage(share, "evil-link")
    assert e.value.field == "register_as"
    (share.root / "models" / "out-link").symlink_to(outside, target_is_directory=True)
    spec = {"adapters": ["support/v3"], "into": "base", "output": "models/out-link/new/m"}
    with pytest.raises(Rejected, match="outside the share") as e:
        run(share, JobSpec(id="m-out-link", kind="merge", merge=spec))
    assert e.value.field == "merge.output" and not list(outside.iterdir())
    (share.root / "models" / "in-link").symlink_to(share.results, target_is_directory=True)  # into the spool
    spec = {**spec, "output": "models/in-link/victim/m"}
    with pytest.raises(Rejected, match="outside the share's models/") as e:
        run(share, JobSpec(id="m-in-link", kind="merge", merge=spec))
    assert e.value.field == "merge.output" and not (share.results / "victim").exists()


def test_manifests_validate_against_their_schema(share: Share, trained: dict) -> None:
    for path in registry.root(share).glob("*/v*/manifest.json"):
        Manifest.model_validate_json(path.read_bytes())


# ── through a worker ──────────────────────────────────────────────────────────────────────────────────────
def test_train_verify_and_merge_jobs_through_a_worker(tmp_path: Path, tiny_model_dir: Path, procs: Any) -> None:
    from tests.conftest import drop, train_job, wait_result
    from worker.tinymodel import write_dataset

    s = make_share(tmp_path / "e2e")  # its own share: this module's "share" fixture is the registry's
    shutil.copytree(tiny_model_dir, s.root / "models" / "tiny")
    write_dataset(s.root / "datasets" / "alpaca.jsonl", "alpaca", rows=64)
    procs.worker(s, "w1")
    drop(s, "t1.json", {**train_job("t1", steps=4), "register_as": "support"})
    r = wait_result(s, "t1", 180)
    assert r.status is Terminal.succeeded and r.registered == "support/v1", r.error
    drop(s, "v1.json", {"id": "v1", "kind": "verify", "verify": {"adapter": "support/v1"}})
    drop(s, "m1.json", {"id": "m1", "kind": "merge", "merge": {"adapters": ["support/v1"], "into": "base"}})
    drop(s, "bad.json", {"id": "bad", "kind": "verify", "verify": {"adapter": "support/v7"}})
    verified, merged = wait_result(s, "v1", 120), wait_result(s, "m1", 120)
    assert verified.status is Terminal.succeeded and verified.verify is not None and verified.verify.ok
    assert merged.status is Terminal.succeeded and merged.merged_model == "models/merged/support-v1"
    bad = wait_result(s, "bad", 60)
    assert bad.status is Terminal.rejected and bad.error.startswith("verify.adapter: 'support/v7' is not registered")
    assert bad.error.endswith("the id 'bad' is used now: drop the fixed job under a new id"), "rejected as it ran"


def test_merge_on_the_command_line_names_its_flags_in_errors(share: Share) -> None:
    """A person who typed --name and --out reads about --name and --out, not register_as and merge.output."""
    out = _cli("merge", "support/v1", "--into", "base", "--name", "foo", "--share", str(share.root))
    assert out.returncode != 0 and "--name" in out.stderr and "register_as" not in out.stderr, out.stderr
    out = _cli("merge", "support/v1", "--into", "base", "--out", "/abs", "--share", str(share.root))
    assert out.returncode != 0 and "--out" in out.stderr and "merge.output" not in out.stderr, out.stderr


def test_adapter_folders_with_a_fifo_or_a_link_out_of_the_share_are_refused(share: Share, trained: dict,
                                                                            tmp_path: Path) -> None:
    """Adapter folders come from anyone with the share (an adversarial review ran these). A FIFO named
    adapter_config.json held a verify job in its open for good; weights linked out of the share trained as a
    parent and were merged into a new base. Each is now rejected before anything reads it."""
    folder = share.root / "incoming" / "fifo-cfg"
    shutil.copytree(version(share, "billing/v1"), folder)
    (folder / "adapter_config.json").unlink()
    os.mkfifo(folder / "adapter_config.json")
    with pytest.raises(Rejected, match="neither a file nor a folder") as seen:
        run(share, JobSpec(id="v-fifo", kind="verify", verify={"adapter": "incoming/fifo-cfg"}))
    assert seen.value.field == "verify.adapter"

    outside = tmp_path / "outside"
    outside.mkdir()
    _register_copies(share, trained, "linkout", [[]])
    weights = version(share, "linkout/v1") / "adapter_model.safetensors"
    shutil.copyfile(weights, outside / "w.safetensors")
    weights.unlink()
    weights.symlink_to(outside / "w.safetensors")
    cases = {"parent": _job("l-child", parent="linkout/v1"),
             "merge.adapters": JobSpec(id="l-merge", kind="merge", base_model="models/tiny",
                                       merge={"adapters": ["linkout/v1", "billing/v1"], "into": "adapter"}),
             "verify.adapter": JobSpec(id="l-verify", kind="verify", verify={"adapter": "linkout/v1"})}
    try:
        for field, job in cases.items():
            with pytest.raises(Rejected, match="outside the share") as seen:
                run(share, job)
            assert seen.value.field == field
    finally:  # the module's share is used by later tests: no version linking out of it stays
        shutil.rmtree(version(share, "linkout/v1").parent)
        shutil.rmtree(folder)


def test_a_verify_job_silent_for_too_long_is_ended(share: Share, trained: dict, tmp_path: Path) -> None:
    """Phases that do not report as they go (verifying here) get SILENT_FACTOR x stall_seconds, not forever: a
    verify job whose base's chat template loops 10^10 times sat in "verifying" for good (adversarial review)."""
    from worker import horse

    loop_base = share.root / "models" / "tiny-loop"
    shutil.copytree(share.root / "models" / "tiny", loop_base)
    (loop_base / "chat_template.jinja").write_text(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")
    from worker.tinymodel import write_dataset

    write_dataset(share.root / "datasets" / "loop-chat.jsonl", "chat", rows=8)
    folder = share.root / "incoming" / "plain"
    shutil.copytree(version(share, "billing/v1"), folder, ignore=shutil.ignore_patterns(registry.MANIFEST))
    job = JobSpec(id="v-loop", kind="verify", base_model="models/tiny-loop", dataset="datasets/loop-chat.jsonl",
                  verify={"adapter": "incoming/plain"})
    out: list[horse.HorseResult] = []
    runner = threading.Thread(target=lambda: out.append(horse.run(vars(_request(share, job)), lambda _p: None,
                                                                  lambda: None, stall_seconds=4.0)))
    runner.start()
    runner.join(180)
    assert not runner.is_alive(), "the silent verify job was never ended"
    assert out[0].kind == "failed" and "(phase 'verifying')" in (out[0].error or ""), out[0]


def test_a_planted_version_naming_a_train_job_is_not_taken_for_its_registration(share: Share,
                                                                                 trained: dict) -> None:
    """A version whose manifest names a train job that has not run yet (anyone can write one), with a file
    added: the job registers a version of its own, not the planted one, and keeps its training."""
    planted = registry.root(share) / "plantedtrain" / "v1"
    shutil.copytree(version(share, "billing/v1"), planted)
    m = registry.read_manifest(share, registry.Ref("billing", 1))
    assert m is not None
    (planted / registry.MANIFEST).write_text(m.model_copy(update={"job_id": "t-plant", "name": "plantedtrain"})
                                              .model_dump_json())
    (planted / "extra.safetensors").write_bytes(b"x")
    try:
        outcome = run(share, _job("t-plant", register_as="plantedtrain"))
        assert outcome.registered == "plantedtrain/v2"
    finally:
        shutil.rmtree(planted.parent)
