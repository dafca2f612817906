"""Checks on a model folder and a dataset file before anything is loaded. Pure Python: no torch import.

A model folder on a shared drive is input from whoever put it there. Loading it must never run code: no
``trust_remote_code`` (``auto_map``), no pickle weights, no symlink that makes the worker read files from
outside the share. These checks run before torch or transformers touch the folder, so a bad folder is
refused in milliseconds with a sentence that says what to do, instead of failing deep inside a loader.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spooler.errors import Rejected

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Config files whose auto_map asks transformers to import Python code shipped with the model.
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def check_model_dir(path: Path, share_root: Path) -> None:
    """Refuse (``Rejected("base_model", ...)``) a folder that is not a safe, complete safetensors model."""
    path = Path(path)
    if not path.is_dir():
        raise Rejected("base_model", f"{path.name!r} is not a folder; point base_model at a model folder "
                                     "saved with save_pretrained (config.json, tokenizer, *.safetensors)")
    _check_links(path, share_root)
    if not (path / "config.json").is_file():
        raise Rejected("base_model", f"{path.name!r} has no config.json; point base_model at the folder that holds "
                                     "config.json and the weights (as written by save_pretrained)")
    for name in CODE_CONFIGS:
        if "auto_map" in _read_json(path / name):
            raise Rejected("base_model", f"{name} has \"auto_map\", which asks to run Python code shipped with the "
                                         "model (trust_remote_code); this worker never runs such code: use a model "
                                         "whose architecture transformers supports natively")
    config, stored = _read_json(path / "config.json"), stored_weights(path)
    if stored.integer_weight and "quantization_config" not in config:
        # transformers casts them to floats and trains on (audit, proven): a loss in the thousands, no error.
        raise Rejected("base_model", f"weight {stored.integer_weight} is stored as integers, and config.json has no "
                                     "quantization_config to say how to read them; copy the model again as "
                                     "save_pretrained wrote it")
    _check_sizes(config, stored)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise Rejected("base_model", f"{path.name!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                     "save the tokenizer into the model folder with tokenizer.save_pretrained")


def check_dataset_file(path: Path) -> None:
    """Refuse (``Rejected("dataset", ...)``) a dataset path that is missing, not a file, or empty."""
    path = Path(path)
    if not path.exists():
        raise Rejected("dataset", f"{path.name!r} does not exist; copy the JSONL file to the share or fix the path")
    if not path.is_file():
        raise Rejected("dataset", f"{path.name!r} is not a file; dataset must name a JSONL file, one row per line")
    if path.stat().st_size == 0:
        raise Rejected("dataset", f"{path.name!r} is empty; it needs at least two JSONL rows (one to train, "
                                  "one to evaluate)")
    try:
        open(path, "rb").close()  # a file only its owner may read (safetensors writes 0600) fails later, as "failed"
    except PermissionError as e:
        raise unreadable("dataset", path.name, e) from None


def unreadable(field: str, name: str, e: OSError) -> Rejected:
    """A file or folder the worker's account may not read: input to fix, not a worker fault."""
    return Rejected(field, f"{name!r} cannot be read by the worker's account ({e.strerror or e}); make it "
                           "readable by everyone who uses the share (for example chmod -R a+rX), then submit again")


def _inside(target: Path, root: Path) -> bool:
    return target == root or root in target.parents


def check_registered_adapter(folder: Path, files: dict[str, Any], ref: str, field: str) -> None:
    """A registered version about to be loaded (a parent, a merge input) holds the files its manifest recorded,
    and a LoRA config peft can read. Weights swapped since would be merged or trained on silently, under the
    manifest's hashes; a config of another peft_type drops the adapter from a merge without a word, and a
    malformed one fails deep inside peft, as if the worker had a bug."""
    from worker.verify import compare_files

    if problems := compare_files(folder, files, skip=("manifest.json",)):
        raise Rejected(field, f"{ref} is not what was registered ({problems[0]}); see: loraspool verify {ref}")
    if problem := lora_config_problem(folder):
        raise Rejected(field, f"{ref}: {problem}")


def lora_config_problem(folder: Path) -> str | None:
    """Why ``folder``'s adapter_config.json is not a LoRA config peft can load, or None."""
    config = read_lora_config(folder)
    return config if isinstance(config, str) else None


def read_lora_config(folder: Path) -> dict[str, Any] | str:
    """adapter_config.json as a dict, or why it is not a LoRA config peft can load. The one reading of it, for
    verification and for loading a parent or a merge input alike."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no adapter_config.json: not a PEFT adapter folder (save it with save_pretrained)"
    except (OSError, ValueError, RecursionError) as e:  # nested past Python's recursion limit: RecursionError
        return f"adapter_config.json does not parse ({type(e).__name__}): {str(e)[:120]}"
    if not isinstance(config, dict):
        return "adapter_config.json is not a JSON object"
    if config.get("peft_type", "LORA") != "LORA":
        return f"adapter_config.json's peft_type is {config.get('peft_type')!r}, not LORA"
    r, alpha, targets = config.get("r"), config.get("lora_alpha", 8), config.get("target_modules")
    if not (isinstance(r, int) and not isinstance(r, bool) and 0 < r <= 65536):
        return f"adapter_config.json's r is {r!r}, not a positive whole number"
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
        return f"adapter_config.json's lora_alpha is {alpha!r}, not a number"
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        return f"adapter_config.json's target_modules is {targets!r}, not module names"
    return config


def check_adapter_dir(folder: Path, share_root: Path, field: str) -> None:
    """An adapter folder from the share (a parent, a merge input, one to verify): every link stays in the share,
    and every entry is a folder or a regular file. A FIFO named adapter_config.json blocks the open that reads
    it, for good; a link out of the share would load, or leak into a merge, files from anywhere."""
    _check_links(Path(folder), share_root, field, "adapter")


def _check_links(folder: Path, share_root: Path, field: str = "base_model", what: str = "model") -> None:
    """Every symlink in ``folder`` (files and subfolders, recursively) must lead to an existing path in the share,
    and every entry must be a folder or a regular file (a FIFO or a device would block, or never end, a read).

    Linked subfolders are followed (a Hugging Face cache links snapshots to blobs), each real folder once.
    """
    root = Path(os.path.realpath(share_root))
    seen: set[Path] = set()
    pending = [folder]
    while pending:
        current = pending.pop()
        real = Path(os.path.realpath(current))
        if not _inside(real, root):
            raise Rejected(field, f"{_rel(current, folder)!r} resolves to {real}, outside the share; "
                                  f"copy the {what} into the share instead of linking to it")
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(current))
        except PermissionError as e:
            raise unreadable(field, _rel(current, folder), e) from None
        for entry in entries:
            if entry.is_symlink():
                _check_link(Path(entry.path), folder, root, field, what)
            if entry.is_dir(follow_symlinks=True):
                pending.append(Path(entry.path))
            elif not entry.is_file(follow_symlinks=True):
                raise Rejected(field, f"{_rel(Path(entry.path), folder)!r} is neither a file nor a folder (a FIFO, "
                                      f"socket or device), which a read would wait on for good; remove it from the "
                                      f"{what} folder")


def _check_link(link: Path, folder: Path, root: Path, field: str, what: str) -> None:
    target = Path(os.path.realpath(link))
    name = _rel(link, folder)
    if not _inside(target, root):
        raise Rejected(field, f"{name!r} is a symlink to {target}, outside the share; copy the file into the {what} "
                              "folder instead of linking to it")
    if not target.exists():
        raise Rejected(field, f"{name!r} is a broken symlink (to {target}); copy the file into the {what} folder")


def _rel(path: Path, folder: Path) -> str:
    try:
        return Path(path).relative_to(folder).as_posix() or "."
    except ValueError:
        return str(path)


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``, or {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as e:
        raise unreadable("base_model", path.name, e) from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, not UTF-8, a 5000-digit integer
        raise Rejected("base_model", f"{path.name} is not usable JSON ({type(e).__name__}: {str(e)[:200]}); "
                                     "copy the model folder again") from None
    if not isinstance(data, dict):
        raise Rejected("base_model", f"{path.name} is not a JSON object; copy the model folder again")
    return data


@dataclass(frozen=True)
class Stored:
    """What the safetensors files from_pretrained reads hold, from their headers alone."""

    numbers: int  # elements, all tensors together
    tensors: int
    parameters: int  # the most parameters they can fill: a packed integer tensor holds several 4-bit ones
    size_bytes: int = 0  # the files' sizes: a pre-quantized model holds at most one parameter per bit of them
    integer_weight: str = ""  # the first "*weight" tensor stored in an integer dtype, with it: "name (I32)"


# 4-bit weights packed into integers (bitsandbytes' U8, GPTQ's I32): how many one element can hold, at most.
PACKED = {"U8": 2, "I8": 2, "U16": 4, "I16": 4, "U32": 8, "I32": 8, "U64": 16, "I64": 16}
INTEGERS = frozenset({*PACKED, "BOOL"})


def stored_weights(folder: Path) -> Stored:
    """Safetensors weights must be there, complete; pickle weights alone are refused."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    safe = [n for n in names if n.endswith(".safetensors")]
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if not safe and pickles:
        raise Rejected("base_model", f"{folder.name!r} has only pickle weights ({', '.join(pickles[:3])}); "
                                     "unpickling can run code, so this worker loads safetensors only: convert the "
                                     "weights (load the model and save_pretrained it, which writes *.safetensors) "
                                     "and copy the .safetensors files in")
    if not safe:
        raise Rejected("base_model", f"{folder.name!r} has no weights (no *.safetensors file); copy the model's "
                                     "safetensors files into the folder")
    # What from_pretrained reads: model.safetensors when it is there (an index beside it is then ignored), else
    # the shards the index names. Any other name is never read, and checking it would check the wrong file.
    shards = [] if "model.safetensors" in safe else _index_shards(folder)
    if not shards and "model.safetensors" not in safe:
        raise Rejected("base_model", f"{folder.name!r} has {', '.join(sorted(safe)[:3])} but neither model.safetensors "
                                     f"nor {SAFETENSORS_INDEX}, the only names from_pretrained reads: copy the "
                                     "model as save_pretrained wrote it")
    odd = [s for s in shards if os.path.isabs(s) or ".." in s.replace("\\", "/").split("/")]
    if odd:
        raise Rejected("base_model", f"{SAFETENSORS_INDEX} names shard {odd[0]!r}, which is not a file in the "
                                     "model folder; fix the index or copy the model again")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise Rejected("base_model", f"{SAFETENSORS_INDEX} names {len(missing)} missing shard(s) "
                                     f"({', '.join(missing[:3])}); the copy is incomplete: copy them too")
    loaded = shards or ["model.safetensors"]
    numbers = tensors = parameters = size_bytes = 0
    integer_weight = ""
    for name in loaded:  # the header only: a truncated copy or a hostile header fails here, not in a loader
        try:
            header = read_header(folder / name)
        except PermissionError as e:
            raise unreadable("base_model", name, e) from None
        except (OSError, ValueError) as e:
            raise Rejected("base_model", f"{name}: {e}; the file is broken or was cut short: copy it again") from None
        size_bytes += (folder / name).stat().st_size
        for info in header.values():
            count = math.prod(info["shape"])
            numbers, tensors = numbers + count, tensors + 1
            parameters += count * PACKED.get(info["dtype"], 1)
        integer_weight = integer_weight or next((f"{key} ({info['dtype']})" for key, info in header.items()
                                                 if key.endswith("weight") and info["dtype"] in INTEGERS), "")
    return Stored(numbers, tensors, parameters, size_bytes, integer_weight)


# Sizes that shape the model's tensors: each a positive whole number, or a list of them (per layer, in some models).
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim")
# Mixture-of-experts sizes (0 or absent in dense variants): none can be more than the numbers the weights hold.
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def _check_sizes(config: dict, stored: Stored) -> None:
    """The model is built from config.json before a weight is read: a size no weight file could fill (a typo,
    a config copied from another model, a hostile 10^15 vocabulary) would fail deep in a loader, or try to
    allocate it. Each layer has tensors of its own, so there are no more layers than tensors; that also bounds
    the time it takes to build the model's structure for ``check_parameters``."""
    numbers = stored.numbers
    text = config.get("text_config")
    for where, raw in (("", config), ("text_config.", text if isinstance(text, dict) else {})):
        section, named = _common_names(raw)
        for key in SIZE_KEYS:
            value = section.get(key)
            values = value if isinstance(value, list) else [value]
            if value is None or all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
                continue
            raise Rejected("base_model", f"config.json: {where}{named(key)} is {str(value)[:60]}, not a positive "
                                         "whole number; copy the model's own config.json again")
        for key in (*SIZE_KEYS, *EXPERT_KEYS):
            value = section.get(key)
            if isinstance(value, int) and value > numbers:
                raise Rejected("base_model", f"config.json: {where}{named(key)} is {value}, more than all the numbers "
                                             f"the weight files hold ({numbers}); copy the model's own config.json")
        vocab, hidden = section.get("vocab_size"), section.get("hidden_size")
        if isinstance(vocab, int) and isinstance(hidden, int) and vocab * hidden > numbers:
            raise Rejected("base_model", f"config.json: {where}vocab_size x hidden_size ({vocab} x {hidden}) is more "
                                         f"numbers than the weight files hold ({numbers}), so this config.json does "
                                         "not belong to these weights; copy the model's own config.json")
    for name, layers in _layer_counts(config):
        if layers > stored.tensors:
            raise Rejected("base_model", f"config.json: {name} is {layers}, more than the {stored.tensors} tensors the "
                                         "weight files hold, so this config.json does not belong to these weights; "
                                         "copy the model's own config.json")


# A layer count, by the names model types use: num_hidden_layers, n_layer (GPT-2), num_layers, decoder_layers,
# num_decoder_layers (ProphetNet), ..., in sub-configs too (text_config, decoder, ...). Named one by one: a pattern
# also took max_window_layers, which Qwen2 and Qwen3 configs keep at 28 in a two-layer model (review).
LAYER_KEYS = frozenset({"num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers",
                        "num_decoder_layers", "num_encoder_layers"})


def _layer_counts(config: dict, where: str = "", depth: int = 0) -> list[tuple[str, int]]:
    """Every whole number config.json gives under a layer-count name, with where it is: a config class reads
    its own names, and one the check did not know (num_layers, read by some model types) built a million layers
    for hours before anything was refused (audit, proven)."""
    found: list[tuple[str, int]] = []
    names = LAYER_KEYS | {_attribute_map(config.get("model_type")).get("num_hidden_layers")}  # the type's own name
    for key, value in config.items() if depth < 8 else ():
        if isinstance(value, dict):
            found += _layer_counts(value, f"{where}{key}.", depth + 1)
        elif isinstance(value, int) and not isinstance(value, bool) and key in names:
            found.append((f"{where}{key}", value))
    return found


def _common_names(section: dict) -> tuple[dict, Callable[[str], str]]:
    """``section`` with its sizes also under transformers' common names, and the name the file itself uses for
    each. GPT-2 writes n_layer, n_embd and n_head; its config class maps them (``attribute_map``) to
    num_hidden_layers, hidden_size and num_attention_heads, so the bounds above, read by the common names alone,
    never saw them: a 60,000-layer GPT-2 config built for minutes, unrefused."""
    own = _attribute_map(section.get("model_type"))
    common = {**section, **{c: section[o] for c, o in own.items() if c not in section and o in section}}
    return common, lambda key: own[key] if key not in section and key in own else key


def _attribute_map(model_type: Any) -> dict[str, str]:
    """transformers' common name -> this model type's own name; {} for a type it does not know."""
    if not isinstance(model_type, str):
        return {}
    try:
        from transformers import CONFIG_MAPPING

        mapping = getattr(CONFIG_MAPPING[model_type], "attribute_map", None) or {}
    except Exception:  # noqa: BLE001 - an unknown or odd model_type: it is refused where the model is built
        return {}
    return {c: o for c, o in mapping.items() if isinstance(c, str) and isinstance(o, str)}


def _index_shards(folder: Path) -> list[str]:
    """The shard files a sharded checkpoint's index names ([] when the checkpoint is not sharded)."""
    weight_map = _read_json(folder / SAFETENSORS_INDEX).get("weight_map") or {}
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise Rejected("base_model", f"{SAFETENSORS_INDEX} has a malformed weight_map; copy the model again")
    return sorted(set(weight_map.values()))


DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "I16": 2,
               "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}
# Sub-byte and newer dtypes safetensors knows, in bits per element (packed: bytes = ceil(elements * bits / 8)).
DTYPE_BITS = {**{k: 8 * v for k, v in DTYPE_BYTES.items()}, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}
MAX_HEADER = 100 * 2**20  # safetensors' own limit: a header that claims more is corrupt or hostile


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file declares, read without loading any; ValueError says what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"its header claims {n} bytes, the file has {size - 8} after the length")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, a 5000-digit integer
            raise ValueError(f"its header is not usable JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for key, info in header.items():
        try:
            _check_entry(key, info, data_bytes)
        except TypeError:  # offsets or shape of the wrong JSON type: the file is hostile or broken
            raise ValueError(f"{key}: malformed header entry {str(info)[:200]}") from None
    _check_layout(header, data_bytes)
    return header


def _check_layout(header: dict[str, dict[str, Any]], data_bytes: int) -> None:
    """The tensors tile the data exactly, as the safetensors library requires: in offset order, each starts where
    the last ended, from 0 to the end of the file. Overlapping or gapped offsets are refused here, by name,
    rather than by the loader as a "failed" job."""
    at = 0
    for key, info in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        start, end = info["data_offsets"]
        if start != at:
            raise ValueError(f"{key}: starts at byte {start} of the data, where the tensors before it end at {at} "
                             "(overlapping or gapped offsets)")
        at = end
    if at != data_bytes:
        raise ValueError(f"the tensors end at byte {at} of the data, but the file has {data_bytes}")


def _check_entry(key: str, info: Any, data_bytes: int) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ValueError(f"{key}: malformed header entry")
    shape, (start, end) = info["shape"], info["data_offsets"]
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= start <= end <= data_bytes:
        raise ValueError(f"{key}: shape {shape} or offsets {[start, end]} do not fit the file")
    if not isinstance(info["dtype"], str):
        raise TypeError("dtype")  # reported as a malformed entry, like offsets or a shape of the wrong type
    bits = DTYPE_BITS.get(info["dtype"])
    if bits is None:
        raise ValueError(f"{key}: dtype {str(info['dtype'])[:40]!r} is not one safetensors defines")
    if -(-math.prod(shape) * bits // 8) != end - start:
        raise ValueError(f"{key}: {end - start} bytes for shape {shape} of {info['dtype']}")
