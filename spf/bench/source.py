"""A benchmark YAML as a mapping, with ``extends:`` resolved: a file may name another (relative to its own
folder) whose keys it inherits — mappings merge key by key, anything else (lists, scalars) the child
replaces. The dev-prompt tuning benchmark is the test benchmark with a few keys changed
(``bench/cpu_dev.yaml``), not a copy that drifts from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spf.loaders import ConfigFileError, load_yaml_file

__all__ = ["BenchSourceError", "merge", "read_bench_yaml"]

MAX_DEPTH = 4  # files in one extends chain beyond the first


class BenchSourceError(ValueError):
    """A benchmark file that cannot be read or whose ``extends`` chain is broken (names the file)."""


def merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``parent``: mappings merged recursively, every other value replaced."""
    out = dict(parent)
    for key, value in child.items():
        old = out.get(key)
        out[key] = merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def read_bench_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The top-level mapping of ``path`` with its ``extends`` chain merged in (the key itself removed)."""
    if not path.exists():
        raise BenchSourceError(f"{path}: benchmark file not found")
    try:  # strict: no aliases (expansion bombs), duplicate keys, empty file, folder, > 1 MiB
        raw = load_yaml_file(path)
    except ConfigFileError as exc:
        raise BenchSourceError(str(exc)) from None
    if not isinstance(raw, dict):
        raise BenchSourceError(f"{path}: expected a mapping at the top level")
    raw = dict(raw)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent:
        raise BenchSourceError(f"{path}: extends: expected the path of another benchmark file")
    target = (path.parent / parent).resolve()
    chain = (*_chain, path.resolve())
    if target in chain:
        raise BenchSourceError(f"{path}: extends: {parent} is already in the chain (a cycle)")
    if len(chain) > MAX_DEPTH:
        raise BenchSourceError(f"{path}: extends: more than {MAX_DEPTH} files deep")
    try:
        base = read_bench_yaml(target, chain)
    except BenchSourceError as exc:
        raise BenchSourceError(f"{path}: extends {parent}: {exc}") from None
    return merge(base, raw)
