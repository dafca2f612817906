"""The local model cache, on real folders: copied once and verified, re-copied only when the share's copy
changes, old copies kept, racing processes end on one copy."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spooler.errors import Rejected
from worker.modelcache import MANIFEST, CacheError, cache_key, commit, local_copy, read_manifest, stale_copies


def _safetensors(n: int) -> bytes:
    """A well-formed safetensors file of one U8 tensor of random bytes: the model check reads its header."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    return len(header).to_bytes(8, "little") + header + os.urandom(n)


MODEL = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"version": "1.0"}',
         "model.safetensors": _safetensors(300_000), "generation_config.json": b"{}"}
JUNK = {"README.md": b"# hi", "pytorch_model.bin": b"pickle", "modeling_x.py": b"import os", ".hidden.safetensors": b""}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "share" / "models" / "base"
    folder.mkdir(parents=True)
    for name, data in {**MODEL, **JUNK}.items():
        (folder / name).write_bytes(data)
    return folder


def versions(cache: Path, src: Path) -> list[Path]:
    return sorted((cache / "models" / cache_key(src)).glob("v-*"))


def test_copies_only_model_files_verified(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    copy = local_copy(model, cache, share_root=tmp_path / "share")
    assert copy.parent == cache / "models" / cache_key(model) and copy.name.startswith("v-")
    assert sorted(p.name for p in copy.iterdir()) == sorted([*MODEL, MANIFEST])
    for name, data in MODEL.items():
        assert (copy / name).read_bytes() == data
    doc = read_manifest(copy)
    assert doc is not None and doc["source"] == os.path.realpath(model)
    assert {f["name"]: f["sha256"] for f in doc["files"]} == {n: hashlib.sha256(d).hexdigest() for n, d in
                                                               MODEL.items()}
    assert not list(copy.parent.glob(".tmp-*"))


def test_second_job_reuses_the_copy_without_copying(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = local_copy(model, cache)
    stamp = (first / "model.safetensors").stat().st_mtime_ns, (first / MANIFEST).stat().st_mtime_ns
    second = local_copy(model, cache)
    assert second == first and versions(cache, model) == [first]
    assert ((first / "model.safetensors").stat().st_mtime_ns, (first / MANIFEST).stat().st_mtime_ns) == stamp


def test_a_changed_share_copy_is_copied_again_and_the_old_one_kept(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old = local_copy(model, cache)
    (model / "model.safetensors").write_bytes(os.urandom(300_000))
    new = local_copy(model, cache)
    assert new != old and (old / "model.safetensors").read_bytes() == MODEL["model.safetensors"]
    assert (new / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert stale_copies(model, cache) == [old]
    assert local_copy(model, cache) == new


def test_a_touched_but_unchanged_copy_keeps_its_folder(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = local_copy(model, cache)
    st = (model / "config.json").stat()
    os.utime(model / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    again = local_copy(model, cache)
    assert again == first and versions(cache, model) == [first]
    doc = read_manifest(first)
    assert doc is not None
    assert {f["name"]: f["mtime_ns"] for f in doc["files"]}["config.json"] == st.st_mtime_ns + 5_000_000_000


def test_two_processes_racing_end_on_one_copy(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code = "import sys; from worker.modelcache import local_copy; print(local_copy(sys.argv[1], sys.argv[2]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(model), str(cache)], stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1 and [str(p) for p in versions(cache, model)] == outs[:1]
    assert not list((cache / "models" / cache_key(model)).glob(".tmp-*"))


def test_the_loser_of_a_commit_uses_the_winners_copy(tmp_path: Path) -> None:
    final, tmp = tmp_path / "v-abc", tmp_path / ".tmp-1-x"
    for folder, data in ((final, b"winner"), (tmp, b"loser")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(data)
        (folder / MANIFEST).write_text(json.dumps({"files": []}))
    manifest = {"files": [{"name": "model.safetensors", "size": 6, "mtime_ns": 1, "sha256": "x"}]}
    assert commit(tmp, final, manifest) == final
    assert not tmp.exists() and (final / "model.safetensors").read_bytes() == b"winner"
    assert read_manifest(final) == manifest


def test_a_dead_copiers_leftover_is_swept(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    key_dir = cache / "models" / cache_key(model)
    leftover = key_dir / f".tmp-{int(dead.stdout)}-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    local_copy(model, cache)
    assert not leftover.exists()


def test_a_file_changing_during_the_copy_is_refused(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    target = model / "config.json"
    calls = []

    def someone_writes() -> bool:
        if not calls:  # a person still copying the model onto the share
            with open(target, "ab") as f:
                f.write(b" ")
        calls.append(1)
        return False

    with pytest.raises(CacheError, match="changed while it was copied"):
        local_copy(model, cache, should_stop=someone_writes)
    assert versions(cache, model) == [] and not list((cache / "models" / cache_key(model)).glob(".tmp-*"))


def test_a_stop_abandons_the_copy(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(CacheError, match="stopped"):
        local_copy(model, cache, should_stop=lambda: True)
    assert versions(cache, model) == [] and not list((cache / "models" / cache_key(model)).glob(".tmp-*"))


def test_the_share_folder_is_checked_first(tmp_path: Path) -> None:
    folder = tmp_path / "share" / "models" / "pickled"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(Rejected, match="only pickle weights"):
        local_copy(folder, tmp_path / "cache", share_root=tmp_path / "share")
    with pytest.raises(CacheError, match="no \\*.safetensors"):
        local_copy(folder, tmp_path / "cache")


def test_same_name_at_two_share_paths_gets_two_folders(tmp_path: Path) -> None:
    a, b = tmp_path / "x" / "base", tmp_path / "y" / "base"
    assert cache_key(a) != cache_key(b) and cache_key(a).startswith("base-")


def test_named_chat_templates_are_copied_so_the_copy_renders_as_the_share_does(tiny_model_dir: Path,
                                                                               tmp_path: Path) -> None:
    """transformers reads additional_chat_templates/*.jinja, and a "default.jinja" there replaces the model's
    template: a copy without that folder would train on other text than the share's folder gives."""
    import shutil

    from transformers import AutoTokenizer

    src = tmp_path / "share" / "models" / "t"
    shutil.copytree(tiny_model_dir, src)
    extra = src / "additional_chat_templates"
    extra.mkdir()
    (extra / "default.jinja").write_text("{% for m in messages %}<<{{ m.content }}>>{% endfor %}")
    (extra / "tool_use.jinja").write_text("tools")
    (extra / "notes.txt").write_text("not a template")
    cache = tmp_path / "cache"
    copy = local_copy(src, cache, share_root=tmp_path / "share")
    assert sorted(p.name for p in (copy / "additional_chat_templates").iterdir()) == ["default.jinja",
                                                                                      "tool_use.jinja"]
    chat = [{"role": "user", "content": "hi"}]
    want = AutoTokenizer.from_pretrained(src).apply_chat_template(chat, tokenize=False)
    assert AutoTokenizer.from_pretrained(copy).apply_chat_template(chat, tokenize=False) == want == "<<hi>>"
    assert local_copy(src, cache) == copy
    (extra / "default.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    again = local_copy(src, cache)
    assert again != copy and AutoTokenizer.from_pretrained(again).apply_chat_template(chat, tokenize=False) == "[hi]"
