"""The one reader of user data files: regular files only, bounded in size, strict about text and JSON.

A data path is handed to us by a user or a pipeline and read unattended, so reading it must neither hang nor
exhaust memory, and must not let the file's text change what the model is trained on behind the user's back:

- only regular files are read: a FIFO would block ``open`` forever and ``/dev/zero`` (or a symlink to it) never
  ends, so the kind is checked with ``stat`` before opening, and again on the opened descriptor (the path may
  be swapped in between);
- a file over ``$SPF_MAX_DATA_BYTES`` (default 512 MiB) and a line over ``$SPF_MAX_LINE_BYTES`` (default 1 MiB)
  are refused before anything is decoded or parsed: one 8 MB line used to take minutes and gigabytes in the
  tokenizer;
- text must be UTF-8 (a BOM-less UTF-16 file is named as such instead of "invalid JSON");
- JSON objects with a duplicate key and CSV/TSV headers with a duplicate column are errors (the second value
  would silently win), as are NaN/Infinity and lone surrogates (``"\\ud800"``, not text);
- strings holding chat markers (``<|im_start|>`` …) are refused: the chat template would turn them into real
  turn boundaries, so a dataset could inject system or assistant turns.

Every error is a :class:`DataError` naming the file, the line (or ``record N`` of a JSON list) and the field.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_MARKERS",
    "DEFAULT_MAX_DATA_BYTES",
    "DEFAULT_MAX_LINE_BYTES",
    "MAX_DATA_BYTES_ENV",
    "MAX_LINE_BYTES_ENV",
    "DataError",
    "check_value",
    "duplicate_key",
    "iter_delimited",
    "iter_json",
    "iter_jsonl",
    "parse_json",
    "read_data_bytes",
    "read_data_text",
]

MAX_DATA_BYTES_ENV = "SPF_MAX_DATA_BYTES"
MAX_LINE_BYTES_ENV = "SPF_MAX_LINE_BYTES"
DEFAULT_MAX_DATA_BYTES = 512 << 20
DEFAULT_MAX_LINE_BYTES = 1 << 20

# Turn markers of the common chat formats (ChatML, Llama 3, Llama 2 / Mistral, Zephyr/Phi). They are refused
# whatever the model, at load time; encode time also refuses the model tokenizer's own special tokens
# (spf.data.samples). Refused rather than escaped: escaping would silently change the text the user meant
# to train on, and such text in a fine-tuning set is far more often an injection than an intent.
# sentencepiece's <s>/</s> are not on this list: they are also ordinary HTML (strikethrough), and a model
# that uses them as BOS/EOS has them among its special tokens, which encode time refuses.
CHAT_MARKERS: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[INST]",
    "[/INST]",
    "<|endoftext|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
)
_MARKER_RE = re.compile("|".join(re.escape(m) for m in CHAT_MARKERS))
_SURROGATE_RE = re.compile("[\ud800-\udfff]")

# UTF-32 first: its little-endian mark starts with UTF-16's.
_OTHER_BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class DataError(ValueError):
    """Malformed or unusable data; the message names the file, the line/record and the field."""


def type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def data_error(where: str, message: str, field: str | None = None) -> DataError:
    if field is None:
        return DataError(f"{where}: {message}")
    if len(field) > 60:  # a field name is data too: a 200 KB key must not become a 200 KB message
        field = field[:57] + "..."
    return DataError(f"{where}: field '{field}': {message}")


def _header_text(header: list[str]) -> str:
    shown = ", ".join(repr(h[:30]) for h in header[:6])
    return f"({len(header)} columns: {shown}{', ...' if len(header) > 6 else ''})"


def _limit(env: str, default: int) -> int:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DataError(f"${env}: expected a whole number of bytes, got {raw[:40]!r}") from None
    if value < 1:
        raise DataError(f"${env}: must be ≥ 1 byte, got {value}")
    return value


def max_data_bytes() -> int:
    return _limit(MAX_DATA_BYTES_ENV, DEFAULT_MAX_DATA_BYTES)


def max_line_bytes() -> int:
    return _limit(MAX_LINE_BYTES_ENV, DEFAULT_MAX_LINE_BYTES)


def _kind(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def _regular_file(path: Path) -> tuple[Path, int]:
    """The resolved path and size of ``path``, which must be (a link to) a regular file; nothing is opened."""
    try:
        real = path.resolve(strict=True)
        st = real.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except RuntimeError:  # a symlink loop (Python < 3.13)
        raise DataError(f"{path}: symlink loop") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path}: is a folder, not a data file")
    if not stat.S_ISREG(st.st_mode):
        target = f"{real} is " if path.is_symlink() else "it is "
        raise DataError(
            f"{path}: not a regular file ({target}{_kind(st.st_mode)}); data must be a regular file"
        )
    return real, st.st_size


def _too_big(path: Path, size: int | str, limit: int) -> DataError:
    return DataError(
        f"{path}: {size} bytes, over the data file limit of {limit} bytes (set {MAX_DATA_BYTES_ENV} to raise it)"
    )


def read_data_bytes(path: str | Path) -> bytes:
    """The bytes of a regular file of at most ``$SPF_MAX_DATA_BYTES``; anything else is a :class:`DataError`."""
    path = Path(path)
    real, size = _regular_file(path)
    limit = max_data_bytes()
    if size > limit:
        raise _too_big(path, size, limit)
    # O_NONBLOCK: should the path have become a FIFO since the stat, open returns at once instead of waiting
    # for a writer; the fstat below then refuses it. It changes nothing for a regular file.
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{path}: not a regular file (it is {_kind(mode)}); data must be a regular file")
        raw = fh.read(limit + 1)  # bounded even if the file grows while we read
    if len(raw) > limit:
        raise _too_big(path, f"more than {limit}", limit)
    return raw


def _nul_error(path: Path, raw: bytes, at: int) -> DataError:
    head = raw[:4096]
    odd, even = head[1::2].count(0), head[0::2].count(0)
    # ASCII text in UTF-16 has a NUL in every other byte (odd positions: little-endian).
    if max(odd, even) * 4 >= len(head) // 2:
        hint = (
            f"looks like UTF-16{'-LE' if odd >= even else '-BE'} without a byte-order mark: save it as UTF-8"
        )
    else:
        hint = "a NUL byte; is it a binary file?"
    line = raw.count(b"\n", 0, at) + 1
    return DataError(f"{path.name}:{line}: not UTF-8 text ({hint})")


def check_line_lengths(path: Path, raw: bytes, limit: int | None = None) -> None:
    """Refuse a line longer than ``limit`` bytes (default ``$SPF_MAX_LINE_BYTES``), before any parsing."""
    limit = max_line_bytes() if limit is None else limit
    if len(raw) <= limit:
        return
    start, end_of_data = 0, len(raw)
    while start < end_of_data:
        end = raw.find(b"\n", start)
        end = end_of_data if end == -1 else end
        if end - start > limit:
            line = raw.count(b"\n", 0, start) + 1
            raise DataError(
                f"{path.name}:{line}: line is {end - start} bytes, over the limit of {limit} bytes per line "
                f"(set {MAX_LINE_BYTES_ENV} to raise it)"
            )
        start = end + 1


def read_data_text(path: str | Path, *, check_lines: bool = True) -> str:
    """A data file's text: :func:`read_data_bytes`, then UTF-8 (an optional BOM dropped) and, for line-based
    formats (``check_lines``), at most ``$SPF_MAX_LINE_BYTES`` per line. A JSON document may be one long line
    (minified), so :func:`iter_json` limits each record instead."""
    path = Path(path)
    raw = read_data_bytes(path)
    for bom, name in _OTHER_BOMS:
        if raw.startswith(bom):
            raise DataError(f"{path}: file is {name} (byte-order mark); save it as UTF-8")
    nul = raw.find(b"\x00")
    if nul != -1:
        raise _nul_error(path, raw, nul)
    if check_lines:
        check_line_lengths(path, raw)
    try:
        # utf-8-sig: spreadsheet exports often start with a BOM, which would otherwise become part of the
        # first column's name and hide the prompt column.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path.name}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


# ------------------------------------------------------------------------------------------------- values


class _Duplicated(dict):
    """A JSON object that had a key twice (``json`` keeps the last value); :func:`check_value` reports it."""

    duplicate: str = ""


class _Constant(float):
    """NaN / Infinity, which :mod:`json` accepts although they are not JSON."""

    name: str = ""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    duplicate = None
    for key, value in pairs:
        if key in out and duplicate is None:
            duplicate = key
        out[key] = value
    if duplicate is None:
        return out
    # Marked, not raised: only the caller knows the record (and line) the object belongs to.
    marked = _Duplicated(out)
    marked.duplicate = duplicate
    return marked


def duplicate_key(value: Any) -> str | None:
    """The first repeated key of a parsed JSON object, or ``None``."""
    return value.duplicate if isinstance(value, _Duplicated) else None


def _constant(name: str) -> float:
    value = _Constant(name)
    value.name = name
    return value


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)


def _child(field: str | None, key: str | int) -> str:
    if isinstance(key, int):
        return f"{field or ''}[{key}]"
    return f"{field}.{key}" if field else key


def check_string(where: str, text: str, field: str | None) -> None:
    """Refuse lone surrogates (not text: encoding fails later, far from the file) and chat markers."""
    if _SURROGATE_RE.search(text):
        raise data_error(
            where, "contains a lone surrogate (an unpaired \\ud800-\\udfff escape); not text", field
        )
    marker = _MARKER_RE.search(text)
    if marker:
        raise data_error(
            where,
            f"contains the chat marker {marker.group()!r}; the chat template would make it a real turn "
            "boundary (injected roles), so it is refused; remove it from the data",
            field,
        )


def check_value(where: str, value: Any, field: str | None = None) -> int:
    """Check every string, key and number inside a parsed record; return its characters of text.

    Iterative, so that a record nested as deeply as :mod:`json` accepts cannot overflow the Python stack."""
    size = 0
    stack: list[tuple[Any, str | None]] = [(value, field)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            check_string(where, item, at)
            size += len(item)
        elif isinstance(item, _Constant):
            raise data_error(where, f"{item.name} is not valid JSON (write a number or null)", at)
        elif isinstance(item, Mapping):
            if isinstance(item, _Duplicated):
                raise data_error(
                    where,
                    "duplicate key: the second value would silently replace the first",
                    _child(at, item.duplicate),
                )
            for key, child in reversed(item.items()):  # reversed: report the first problem in file order
                name = _child(at, str(key))
                check_string(where, str(key), name)
                size += len(str(key))
                stack.append((child, name))
        elif isinstance(item, list):
            stack.extend((child, _child(at, i)) for i, child in reversed(list(enumerate(item))))
    return size


def _record_field(record: Any) -> str | None:
    # A bare list record is a conversation; name its items the way ChatSample does (messages[i].content).
    return "messages" if isinstance(record, list) else None


# ------------------------------------------------------------------------------------------------ formats


def parse_json(path: Path, text: str) -> Any:
    """A whole JSON document, strict; the caller checks the parts it uses with :func:`check_value`."""
    try:
        return _loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path.name}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise DataError(f"{path.name}: invalid JSON: nested too deeply") from None


def iter_json(path: Path, records: list[Any], where_prefix: str = "record") -> Iterator[tuple[str, Any]]:
    """``(FILE:record N, record)`` for each checked record of a parsed JSON list."""
    limit = max_line_bytes()
    for i, record in enumerate(records, start=1):
        where = f"{path.name}:{where_prefix} {i}"
        if check_value(where, record, _record_field(record)) > limit:
            raise DataError(
                f"{where}: holds more than {limit} characters of text, over the per-record limit "
                f"(set {MAX_LINE_BYTES_ENV} to raise it)"
            )
        yield where, record


def iter_jsonl(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """``(FILE:LINE, record)`` for each non-blank, checked line of a JSON Lines text."""
    # Split on "\n" only: str.splitlines() also splits on U+2028/U+0085, which json.dumps(ensure_ascii=False)
    # leaves unescaped inside strings, so it would cut valid records apart.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{lineno}"
        try:
            record = _loads(line)
        except json.JSONDecodeError as exc:
            raise data_error(where, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        except RecursionError:
            raise data_error(where, "invalid JSON: nested too deeply") from None
        check_value(where, record, _record_field(record))
        yield where, record


def iter_delimited(path: Path, text: str, delimiter: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``(FILE:LINE, {column: cell})`` for each row of a CSV/TSV text whose header has unique names and whose
    rows have exactly as many cells as the header."""
    # Cells are bounded like lines (a quoted cell may span lines); above csv's 128 KiB default on purpose:
    # instruction datasets hold multi-kilobyte answers.
    csv.field_size_limit(max_line_bytes())
    kind = path.suffix[1:] or "csv"
    # newline="" as the csv docs require: only \n / \r\n / \r end a row, never U+2028 inside a cell.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header:
            return
        seen: set[str] = set()
        for name in header:
            if name in seen:
                # csv.DictReader would keep the last such column: another column's text trained on silently.
                raise data_error(f"{path.name}:1", "duplicate column in the header", name)
            seen.add(name)
            check_string(f"{path.name}:1", name, name)
        for cells in reader:
            if not cells:
                continue  # a blank line, as csv.DictReader skips
            # line_num is the physical line where the row ends (header = line 1), exact for one-line rows.
            where = f"{path.name}:{reader.line_num}"
            if len(cells) > len(header):
                # More cells than header columns: usually an unquoted delimiter inside a value.
                raise data_error(where, f"row has more cells than the header {_header_text(header)}")
            if len(cells) < len(header):
                raise data_error(where, f"row has fewer cells than the header {_header_text(header)}")
            for name, cell in zip(header, cells, strict=True):
                check_string(where, cell, name)
            yield where, dict(zip(header, cells, strict=True))
    except csv.Error as exc:
        hint = f" (set {MAX_LINE_BYTES_ENV} to raise the limit)" if "field larger" in str(exc) else ""
        raise DataError(f"{path.name}:{reader.line_num}: malformed {kind}: {exc}{hint}") from None
