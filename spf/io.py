"""Output safety: atomic writes, the output guard, and one writer per output folder.

* Atomic writes (:func:`atomic_path`, :func:`atomic_dir`): write to a temporary path beside the target,
  then rename. A crash or a bad record half-way never leaves a partial file where a reader (DVC, MLflow, a
  resume) would take it for a finished one.
* The output guard (:func:`check_output`): an output may not be the installed package, hold git-tracked
  source, or be / hold / lie inside one of the command's own inputs. The two publishers apply the first
  two checks themselves, so a command that forgets the guard still cannot replace ``spf/data`` or a tracked
  file.
* One writer per output (:func:`output_lock`, :func:`claim_output`): a second process writing the same
  output folder fails at once, naming the holder, instead of both "succeeding" with one result lost.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import fcntl
except ImportError:  # not POSIX: outputs are guarded but not locked
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "OutputError",
    "atomic_dir",
    "atomic_path",
    "check_output",
    "claim_output",
    "current_umask",
    "output_lock",
    "path_sha256",
    "save_json",
    "save_tensors",
]

_UMASK_LOCK = threading.Lock()
# the installed package: this module sits at its top (spf/io.py), so no higher layer is imported to find it
_PACKAGE = Path(__file__).resolve().parent
_GIT_TIMEOUT_S = 5.0


class OutputError(ValueError):
    """An output path that would destroy something (the package, tracked source, an input), that has the
    wrong kind, or that another process is writing. A user error: the CLI reports it in one line, exit 2."""


# ------------------------------------------------------------------------------------------------ guard


def check_output(
    path: str | Path,
    *,
    inputs: Mapping[str, Any] | Iterable[Any] = (),
    what: str = "--out",
    kind: str | None = "dir",
    tracked: bool = True,
) -> Path:
    """Refuse (:class:`OutputError`, one line naming ``what`` and the path) an output that

    (a) is, contains or lies inside the installed ``spf`` package;
    (b) is or contains a git-tracked file of the work tree it lies in (untracked and ignored folders such
        as ``outputs/`` or ``runs/`` are fine; without git this check is skipped; ``tracked=False`` skips
        it for a file that is versioned on purpose, such as DVC's ``cache: false`` metrics);
    (c) is, contains or lies inside one of ``inputs`` (``{name: path}`` or paths; a value that is not an
        existing path — a hub id, a packaged model name, None — is skipped);
    (d) exists with the wrong ``kind`` (``"dir"``: must be a folder; ``"file"``: must not be one; None:
        either).

    Returns the resolved path. Reads only: nothing is created.
    """
    path = Path(path)
    resolved = path.resolve()
    _check_tree(path, resolved, what, tracked)
    _check_inputs(path, resolved, inputs, what)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: exists and is not a folder")
    if kind == "file" and path.is_dir():
        raise OutputError(f"{what} {path}: is a folder, a file is written here")
    return resolved


def _check_tree(path: Path, resolved: Path, what: str, tracked: bool = True) -> None:
    """Checks (a) and (b): the package and tracked source are never an output."""
    if resolved == _PACKAGE or resolved.is_relative_to(_PACKAGE):
        raise OutputError(
            f"{what} {path}: inside the installed spf package ({_PACKAGE}); write outputs elsewhere "
            "(e.g. outputs/ or runs/)"
        )
    if _PACKAGE.is_relative_to(resolved):
        raise OutputError(f"{what} {path}: contains the installed spf package ({_PACKAGE})")
    for root, name in _model_caches():
        if resolved == root or resolved.is_relative_to(root) or root.is_relative_to(resolved):
            raise OutputError(
                f"{what} {path}: overlaps the {name} ({root}), where base models are read from; "
                "write outputs elsewhere"
            )
    found = _tracked_file(resolved) if tracked else None
    if found is not None:
        root, name = found
        how = "is a" if (root / name) == resolved else f"holds {name}, a"
        raise OutputError(
            f"{what} {path}: {how} git-tracked file of {root}; choose an untracked or ignored folder"
        )


def _model_caches() -> list[tuple[Path, str]]:
    """The folders a packaged model name or a hub id is loaded from (``spf.models``): a reference such as
    ``smollm2-135m-instruct`` is not a path the input check (c) can compare, so these are never outputs."""
    spf_cache = os.environ.get("SPF_CACHE_DIR")
    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    roots = [
        (
            Path(spf_cache).expanduser() / "models" if spf_cache else Path.home() / ".cache/spf/models",
            "spf model cache",
        ),
        (Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub").expanduser(), "Hugging Face hub cache"),
    ]
    return [(r.resolve(), name) for r, name in roots]


def _git_root(resolved: Path) -> Path | None:
    for folder in (resolved, *resolved.parents):
        if (folder / ".git").exists():  # a folder, or a file in worktrees and submodules
            return folder
    return None


def _tracked_file(resolved: Path) -> tuple[Path, str] | None:
    """(work tree, one tracked file at or under ``resolved``), or None (none, or git unavailable)."""
    root = _git_root(resolved)
    if root is None:
        return None
    rel = resolved.relative_to(root).as_posix()
    # the repository's own config must not run anything (core.fsmonitor is a command); GIT_* of the
    # caller's environment would point git at another repository
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    cmd = ["git", "-c", "core.fsmonitor=false", "--literal-pathspecs", "-C", str(root)]
    try:
        proc = subprocess.run(
            [*cmd, "ls-files", "-z", "--", rel],
            capture_output=True,
            timeout=_GIT_TIMEOUT_S,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        # a warning, not debug: the protection of the work tree's files is off for this output
        logger.warning(
            "tracked-file check of %s skipped: %s is a git work tree but git failed (%s)", resolved, root, exc
        )
        return None
    if proc.returncode != 0:  # e.g. "dubious ownership" (safe.directory) in a container
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        logger.warning(
            "tracked-file check of %s skipped: git exited %d in %s (%s)",
            resolved, proc.returncode, root, err[0][:120] if err else "no message",
        )  # fmt: skip
        return None
    names = [n for n in proc.stdout.split(b"\0") if n]
    return (root, os.fsdecode(names[0])) if names else None


def _named(inputs: Mapping[str, Any] | Iterable[Any]) -> Iterator[tuple[str, Any]]:
    pairs = inputs.items() if isinstance(inputs, Mapping) else (("an input", v) for v in inputs)
    for name, value in pairs:
        if isinstance(value, list | tuple):
            yield from ((name, v) for v in value)
        else:
            yield name, value


def _check_inputs(path: Path, resolved: Path, inputs: Mapping[str, Any] | Iterable[Any], what: str) -> None:
    """Check (c): writing the output must not overwrite or delete what the command reads."""
    for name, value in _named(inputs):
        if value is None or value == "" or not Path(value).exists():
            continue  # not a path: a hub id or a packaged model name cannot be overwritten
        source = Path(value).resolve()
        if source == resolved:
            how = "is"
        elif source.is_relative_to(resolved):
            how = "contains"
        elif resolved.is_relative_to(source):
            how = "lies inside"
        else:
            continue
        raise OutputError(f"{what} {path}: {how} the input {name} {value}; write the output elsewhere")


# ------------------------------------------------------------------------------------------------- lock
# flock, not a pid file: the kernel releases it when the holder exits or crashes (no stale lock to clear
# by hand, no pid-reuse guessing), it works between processes on one machine and on most network
# filesystems used for shared checkpoints (NFSv4, Lustre, CephFS, GPFS map it to their own locks). The
# honest limit: on NFSv3 without lockd, or a filesystem that only fakes flock locally, two MACHINES can
# both take it — it then protects only against writers on the same machine.

_HELD: dict[str, list[Any]] = {}  # lock file → [fd, depth, folders we created]: re-entrant per process
_HELD_LOCK = threading.Lock()


def _lock_file(path: Path, what: str) -> Path:
    resolved = path.resolve()
    if not resolved.name:
        raise OutputError(f"{what} {path}: is the filesystem root")
    # beside the folder, not in it: atomic_dir replaces the folder itself while the lock is held
    return resolved.parent / f".{resolved.name}.lock"


@contextmanager
def output_lock(path: str | Path, *, what: str = "--out") -> Iterator[Path]:
    """Hold the one-writer lock of the output ``path`` (a sibling ``.<name>.lock``) for the block.

    A second process asking for it fails at once with :class:`OutputError` naming the holder (pid, host,
    start time, command). Re-entrant within one process (a stage that locks its folder may call a
    publisher that locks it again); nested locks on different paths are independent. The lock file holds
    the holder's identity and is removed on release (while still locked, so no other process can be
    holding it); a crash leaves a stale file, which locks nothing and is reused.
    """
    path = Path(path)
    lock = _lock_file(path, what)
    key = str(lock)
    with _HELD_LOCK:
        entry = _HELD.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        fd, made = _acquire(lock, path, what)
        entry = [fd, 1, made]
        with _HELD_LOCK:
            _HELD[key] = entry
    try:
        yield lock
    finally:
        with _HELD_LOCK:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _HELD[key]
        if last:
            _release(lock, entry[0], entry[2])


def _mkdirs(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return those created (outermost first)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _acquire(lock: Path, target: Path, what: str) -> tuple[int | None, list[Path]]:
    made = _mkdirs(lock.parent)
    if fcntl is None:
        logger.warning("no flock on this platform: %s is not protected against a second writer", target)
        return None, made
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileNotFoundError:  # a releasing writer removed the parent folder it had created
            made += _mkdirs(lock.parent)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputError(
                f"{what} {target} is being written by {holder}; wait for it to finish or write elsewhere"
            ) from None
        except OSError as exc:  # ENOLCK / EOPNOTSUPP: a filesystem without locks
            os.close(fd)
            logger.warning(
                "cannot lock %s (%s): %s is not protected against a second writer", lock, exc, target
            )
            return None, made
        if _same_file(fd, lock):
            try:
                _write_holder(fd)
            except OSError as exc:  # who holds it is only informational: the lock itself is taken
                logger.debug("could not record the holder in %s: %s", lock, exc)
            return fd, made
        os.close(fd)  # we locked a file its holder had just unlinked on release: lock the current one
    raise OutputError(f"{what} {target}: could not take the lock {lock} (it keeps being replaced)")


def _same_file(fd: int, lock: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(lock)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _write_holder(fd: int) -> None:
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "cmd": " ".join(sys.argv[:4])[:200],
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _read_holder(fd: int) -> str:
    """'pid N on HOST since T (cmd …)' from the lock file; the holder may be writing it right now."""
    for _ in range(10):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            return f"pid {info['pid']} on {info['host']} since {info['since']} (cmd {info['cmd']})"
        except (ValueError, KeyError, TypeError, OSError):
            time.sleep(0.05)
    return "another process (its lock file names no holder)"


def _release(lock: Path, fd: int | None, made: list[Path]) -> None:
    if fd is not None:
        try:
            if _same_file(fd, lock):
                lock.unlink()  # still locked by us: nobody else can be holding this file
        except OSError:
            pass
        os.close(fd)  # releases the flock
    for folder in reversed(made):  # parents created only for the lock: a failed run leaves nothing
        try:
            folder.rmdir()
        except OSError:
            break


@contextmanager
def claim_output(
    path: str | Path,
    *,
    inputs: Mapping[str, Any] | Iterable[Any] = (),
    what: str = "--out",
    kind: str | None = "dir",
) -> Iterator[Path]:
    """:func:`check_output` then :func:`output_lock` for the block: the one call a command makes for the
    folder it writes. Nothing is created when the check refuses."""
    check_output(path, inputs=inputs, what=what, kind=kind)
    with output_lock(path, what=what):
        yield Path(path)


# ----------------------------------------------------------------------------------------------- atomic


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
def atomic_path(path: str | Path, *, tracked_ok: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``path``.

    Refuses (:class:`OutputError`) a path in the package, an existing folder, or a git-tracked file —
    unless ``tracked_ok``: a result versioned on purpose (DVC's ``cache: false`` metrics, a committed
    report), which a run is meant to rewrite and ``git diff`` shows. The published file gets the mode a plain ``open(path, "w")`` would (0o666 & ~umask): ``mkstemp`` creates
    0600, which would leave adapters and metrics unreadable to the rest of a team."""
    path = Path(path)
    check_output(path, what="output", kind="file", tracked=not tracked_ok)
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
    ``spf align``, ``spf analyze`` and the benchmark's subspaces use it. Because replacing deletes the old
    folder, ``dest`` may never be (in) the package nor hold tracked files (:class:`OutputError`).
    """
    dest = Path(dest)
    check_output(dest, what="output", kind=None)
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


def save_json(obj: Any, path: str | Path, *, tracked_ok: bool = False) -> None:
    """Serialise first (so a non-serialisable object raises before anything is written), then rename.
    ``tracked_ok``: see :func:`atomic_path`."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    with atomic_path(path, tracked_ok=tracked_ok) as tmp:
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
