"""Reading a job file that anyone with write access to the share may have written.

Every way a file can be bad ends in ``Rejected`` naming the field and the problem; nothing here raises
anything else on any input. A file still being copied is told apart from a bad one by the caller
(``spooler.intake``), which only rejects a file that fails here *and* has stopped changing.
"""

from __future__ import annotations

import difflib
import json
import re
import stat
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas.job import JobKind, JobSpec, id_problem
from spooler.errors import Rejected

MAX_DEPTH = 32


def looks_temporary(name: str) -> bool:
    """Names that copy tools, editors and our own writers use while a file is incomplete."""
    lower = name.lower()
    return (
        name.startswith((".", "~"))
        or not lower.endswith(".json")
        or lower.endswith((".tmp.json", ".part.json", ".partial.json"))
    )


def _nesting_depth(text: str) -> int:
    """Bracket depth outside strings, so a hostile file cannot exhaust the parser's recursion."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def read_limited(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, or Rejected("file") without reading a file over the limit, or one that is not a regular
    file: a FIFO named *.json in the inbox would block status, cancel and gc in its open for good."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise Rejected("file", "is not a regular file (a FIFO, socket, device or folder)")
    size = st.st_size
    if size > max_bytes:
        raise Rejected("file", f"{size} bytes is over the {max_bytes}-byte limit for a job file")
    return path.read_bytes()


def peek_id(path: Path, max_bytes: int) -> str:
    """The id a job file will get, for status and cancel; the file name when it cannot be read."""
    try:
        named = json.loads(read_limited(path, max_bytes)).get("id")
    except (OSError, ValueError, AttributeError, RecursionError, Rejected):
        named = None
    return named if isinstance(named, str) else path.stem


class CutShort(Rejected):
    """The JSON stops where the file does, or where only NUL bytes follow: what a copy still under way looks
    like (Windows sets a copy's size first). Rejected all the same, but the intake waits longer for it."""


def decode(data: bytes, max_bytes: int) -> dict[str, Any]:
    """The JSON object in ``data``, or Rejected("file", ...)."""
    if len(data) > max_bytes:
        raise Rejected("file", f"{len(data)} bytes is over the {max_bytes}-byte limit for a job file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if e.reason == "unexpected end of data" or not data[e.end:].strip(b"\x00"):  # a character cut in two
            raise CutShort("file", f"not valid UTF-8 at the end of the file (offset {e.start}), which stops inside a "
                                   "character (cut short?); copy the whole file again") from None
        raise Rejected("file", f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                       "save it as UTF-8") from None
    if (depth := _nesting_depth(text)) > MAX_DEPTH:
        raise Rejected("file", f"nested {depth} levels deep; a job file needs at most {MAX_DEPTH}")
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except Rejected:
        raise
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()):  # the line and column after the last newline would point at nothing
            raise CutShort("file", f"not valid JSON: {e.msg} at the end of the file, which stops before the JSON "
                                   "does (cut short?); copy the whole file again") from None
        if e.msg.startswith("Unterminated string"):  # the scanner found no closing quote before the end
            raise CutShort("file", f"not valid JSON: the string at line {e.lineno} column {e.colno} runs to the end "
                                   "of the file, which stops before the JSON does (cut short?); copy the whole file "
                                   "again") from None
        if CUT_VALUE.fullmatch(text[e.pos:].rstrip("\x00 \t\r\n")):
            raise CutShort("file", f"not valid JSON: the file stops inside a value at line {e.lineno} column "
                                   f"{e.colno} (cut short?); copy the whole file again") from None
        if not text[e.pos:].strip("\x00 \t\r\n"):
            raise CutShort("file", f"not valid JSON: only NUL bytes from line {e.lineno} column {e.colno} on, as a "
                                   "copy that set the file's size first leaves it (cut short?); copy the whole file "
                                   "again") from None
        raise Rejected("file", f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:  # defence in depth; the depth check should have caught it
        raise Rejected("file", "nested too deeply to parse") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise Rejected("file", f"not a usable JSON value: {e}") from None
    if not isinstance(value, dict):
        raise Rejected("file", f"the top level must be a JSON object {{...}}, not {type(value).__name__}")
    if (m := LONE_SURROGATE.search(text)) and not encodable(value):
        raise Rejected("file", f"{m.group(0)} (at offset {m.start()}) is half of a UTF-16 pair, not a character; "
                               "fix the text that has it")
    return value


# What is left where json stops, when a copy stopped inside a number ("0.", "1e") or a literal ("tr", "nul").
CUT_VALUE = re.compile(r"[-+.0-9eE]{1,32}|[a-z]{1,4}")
LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when it names a key twice: json.loads would keep the last one silently, and a
    person who wrote two ids (or two learning rates) meant one of them."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Rejected(key, "appears twice in one object; keep the one you mean")
        out[key] = value
    return out


def encodable(value: Any) -> bool:
    """True when every string in ``value`` is text UTF-8 can write (no lone surrogate from a \\udXXX escape)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _fields_of(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at ``loc``, to suggest the one a person probably meant."""
    for part in loc:
        field = model.model_fields.get(str(part))
        sub = getattr(field, "annotation", None) if field else None
        models = [t for t in (sub, *typing.get_args(sub)) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not models:  # a plain field, or a block that may be null (verify, merge): the model inside counts
            return []
        model = models[0]
    return list(model.model_fields)


def _explain(error: dict[str, Any]) -> Rejected:
    loc = tuple(error["loc"])
    field = ".".join(str(p) for p in loc) or "job"
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = _fields_of(JobSpec, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid fields here: {', '.join(valid)}"
        return Rejected(field, f"unknown field{hint}")
    if kind == "enum" and loc == ("kind",):
        given = str(error.get("input"))
        choices = [k.value for k in JobKind]
        close = difflib.get_close_matches(given, choices, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return Rejected(field, f"{given!r} is not one of {', '.join(choices)}{hint}")
    if kind == "missing":
        return Rejected(field, "is required")
    msg = str(error["msg"]).removeprefix("Value error, ")
    if kind == "value_error" and (named := _named_field(msg, loc)):  # a cross-field check naming the field
        return Rejected(*named)
    if "input" in error and kind not in ("value_error",) and not isinstance(error["input"], dict | list):
        msg = f"{msg}, got {error['input']!r}"
    return Rejected(field, msg)


def _named_field(msg: str, loc: tuple) -> tuple[str, str] | None:
    """("verify.adapter", "has a '..' ...") from "adapter: has a '..' ..." raised at ``verify``: a check across
    fields names the one that is wrong at the start of its message."""
    head, sep, rest = msg.partition(": ")
    if sep and head in _fields_of(JobSpec, loc):
        return ".".join([*(str(p) for p in loc), head]), rest
    return None


def parse_spec(data: bytes, file_name: str, max_bytes: int) -> JobSpec:
    """A valid JobSpec with its id set (from the file name when the job names none), or Rejected."""
    raw = decode(data, max_bytes)
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise _explain(e.errors()[0]) from None
    if spec.id is None:
        stem = Path(file_name).stem
        if problem := id_problem(stem):
            raise Rejected("id", f"no id given, and the file name {problem}; add an \"id\" or rename the file")
        spec.id = stem
    return spec
