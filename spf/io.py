"""Atomic file output: write to a temporary path beside the target, then rename.

A crash or a bad record half-way never leaves a partial file where a reader (DVC, MLflow, a resume)
would take it for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_dir", "atomic_path", "current_umask", "path_sha256", "save_json", "save_tensors"]

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ≥ 4.7: ``/proc``).

    ``os.umask`` can only be read by setting it; between the two calls another thread creating a file
    would get the temporary value. The fallback therefore sets the strictest mask (0o077: such a file is
    private rather than world-writable) and restores at once, under a lock against our own threads.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``path``.

    The published file gets the mode a plain ``open(path, "w")`` would (0o666 & ~umask): ``mkstemp``
    creates 0600, which would leave adapters and metrics unreadable to the rest of a team."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o666 & ~current_umask())  # the writer may have replaced the file: chmod last
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; on success it replaces ``dest``.

    An existing ``dest`` is moved aside, the new folder renamed into place, then the old one deleted, so a
    reader sees either the old complete folder or the new complete one. On an exception nothing changes
    and the temporary folder is removed. The folder gets the mode a plain ``mkdir`` would (``mkdtemp``'s
    0700 would otherwise become the published folder's mode). The one folder publisher: pipeline stages,
    ``spf align``, ``spf analyze`` and the benchmark's subspaces use it.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o777 & ~current_umask())
    try:
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_json(obj: Any, path: str | Path) -> None:
    """Serialise first (so a non-serialisable object raises before anything is written), then rename."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import (
        save_file,  # torch only where tensors are written: pipeline stages import io cheaply
    )

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _json_default(obj: Any) -> Any:
    torch = sys.modules.get("torch")  # not imported → obj cannot be a tensor
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def path_sha256(path: str | Path) -> str:
    """Content hash of a file or a folder (relative names + bytes, sorted): the cache key of an input."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    else:
        raise FileNotFoundError(f"{path} does not exist")
    for rel, p in files:
        h.update(rel.encode() + b"\0")
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes alone — equal to ``sha256sum FILE`` (``path_sha256`` also hashes the name)."""
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
