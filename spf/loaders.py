"""Strict readers for the YAML and JSON that users hand us (``params.yaml``, ``--config``, data files).

PyYAML and :mod:`json` accept shapes that silently change meaning: a second ``finetune:`` block replaces the
first, an alias bomb of a few hundred bytes expands to gigabytes, an empty file reads as "all defaults", and
``{"response": "a", "response": "b"}`` keeps the last value. Here each of those is an error naming the file,
the line (where the parser knows it) and the key. The messages never echo a value: a value may be huge (the
bomb) or a credential pasted in the wrong place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "MAX_CONFIG_BYTES",
    "ConfigFileError",
    "load_config_file",
    "load_json_text",
    "load_yaml_file",
    "load_yaml_text",
]

# A parameter or config file is a few kilobytes; a bigger one is a mistake (a data file passed as config).
MAX_CONFIG_BYTES = 1 << 20


class ConfigFileError(ValueError):
    """A config/params file that cannot be read as one plain mapping; the message starts ``FILE[:LINE]:``."""


def _where(source: str, mark: Any) -> str:
    return f"{source}:{mark.line + 1}" if mark is not None else source


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors/aliases (no expansion bombs, no hidden sharing) and without duplicate keys."""

    source = "<yaml>"

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise ConfigFileError(
                f"{_where(self.source, event.start_mark)}: YAML aliases (*{event.anchor}) are not allowed; "
                "write the value out"
            )
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise ConfigFileError(
                f"{_where(self.source, event.start_mark)}: YAML anchors (&{anchor}) are not allowed; "
                "write the value out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConfigFileError(
                    f"{_where(self.source, key_node.start_mark)}: YAML merge keys (<<) are not allowed"
                )
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise ConfigFileError(
                    f"{_where(self.source, key_node.start_mark)}: a mapping key must be a plain value"
                ) from None
            if key in seen:
                first = seen[key]
                raise ConfigFileError(
                    f"{_where(self.source, key_node.start_mark)}: duplicate key {str(key)[:60]!r} "
                    f"(first at line {first.line + 1}); a second block would silently replace the first"
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str, source: str = "<yaml>", *, allow_empty: bool = False) -> Any:
    """Parse one YAML document strictly. An empty document (nothing but comments/whitespace) is an error
    unless ``allow_empty`` (then ``None``)."""
    loader_cls = type("_Loader", (_StrictLoader,), {"source": source})
    try:
        loader = loader_cls(text)  # the reader rejects control characters here already
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{source}: not valid YAML ({str(exc).splitlines()[0][:80]})") from None
    try:
        node = loader.get_single_node()
        if node is None:
            if allow_empty:
                return None
            raise ConfigFileError(
                f"{source}: empty document (no settings); delete the file to use the defaults"
            )
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigFileError(f"{_where(source, mark)}: not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigFileError(f"{source}: nested too deeply to be a config") from None
    except ValueError as exc:  # ConfigFileError passes through; int() of a >4300-digit number is the other
        if isinstance(exc, ConfigFileError):
            raise
        raise ConfigFileError(f"{source}: a value cannot be read ({str(exc)[:80]})") from None
    finally:
        loader.dispose()
    return data


def _read_config_text(path: Path) -> str:
    if path.is_dir():
        raise ConfigFileError(f"{path}: is a folder, expected a file")
    if path.exists() and not path.is_file():
        raise ConfigFileError(f"{path}: not a regular file")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: file not found") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"{path}: {size} bytes; a config file is at most {MAX_CONFIG_BYTES} bytes")
    raw = path.read_bytes()
    if b"\x00" in raw:  # valid UTF-8, but never in a text config: UTF-16 without a byte-order mark
        raise ConfigFileError(f"{path}: not UTF-8 text (NUL bytes: it looks like UTF-16; save it as UTF-8)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        hint = " (it looks like UTF-16; save it as UTF-8)" if b"\x00" in raw[:200] else ""
        raise ConfigFileError(f"{path}: not UTF-8 text at byte {exc.start}{hint}") from None


def load_yaml_file(path: str | Path, *, allow_empty: bool = False) -> Any:
    """Read ``path`` (a regular UTF-8 file of at most :data:`MAX_CONFIG_BYTES`) as strict YAML."""
    path = Path(path)
    return load_yaml_text(_read_config_text(path), str(path), allow_empty=allow_empty)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigFileError(f"duplicate key {key[:60]!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ConfigFileError(f"{name} is not valid JSON (write a number or null)")


def load_json_text(text: str, source: str = "<json>") -> Any:
    """``json.loads`` that rejects duplicate keys and the non-standard NaN/Infinity, naming ``source``
    (callers reading JSON lines pass ``FILE:LINE``)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ConfigFileError as exc:
        raise ConfigFileError(f"{source}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigFileError(f"{source}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise ConfigFileError(f"{source}: nested too deeply to be a config") from None
    except ValueError as exc:  # a >4300-digit integer
        raise ConfigFileError(f"{source}: a value cannot be read ({str(exc)[:80]})") from None


def load_config_file(path: str | Path) -> Any:
    """A ``--config`` file: YAML for ``.yaml``/``.yml``, JSON otherwise, both strict."""
    path = Path(path)
    text = _read_config_text(path)
    if path.suffix in (".yaml", ".yml"):
        return load_yaml_text(text, str(path))
    return load_json_text(text, str(path))
