"""DVC from the flow: record stage outputs in ``dvc.lock`` and the cache, push them to a remote.

The flow computes the stages itself (Prefect tasks over ``spf.pipeline``) at exactly the paths ``dvc.yaml``
declares, after writing the run's effective parameters to ``params.yaml`` (what ``dvc exp run -S`` does
too). ``dvc commit`` then records the outputs, so ``dvc.lock`` describes the run, ``dvc repro`` afterwards
has nothing to do, and ``dvc push`` versions the data in the remote (local folder by default, S3 by
configuration). DVC runs as a subprocess: its Python API is not stable and it must not share our process.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["DvcError", "dvc", "dvc_commit", "dvc_executable", "dvc_push"]


class DvcError(RuntimeError):
    pass


def dvc_executable() -> str:
    """The ``dvc`` next to this Python (the project venv), else the one on PATH."""
    here = Path(sys.executable).with_name("dvc")
    if here.exists():
        return str(here)
    found = shutil.which("dvc")
    if not found:
        raise DvcError("dvc is not installed (pip install 'dvc[s3]==3.67.1')")
    return found


def dvc(args: list[str], cwd: str | Path, timeout: float = 600) -> str:
    """Run ``dvc ARGS`` in ``cwd``; DvcError with DVC's own message on failure."""
    env = dict(os.environ)
    # stage commands call `spf`: make the venv's scripts visible even when it is not activated
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(
        [dvc_executable(), *args],
        cwd=str(cwd),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise DvcError(f"dvc {' '.join(args)} failed: {' / '.join(msg[-5:])}")
    return proc.stdout


def dvc_commit(cwd: str | Path, stages: list[str] | None = None) -> None:
    """Record the current outputs (and params/deps) of ``stages`` (all when None) in dvc.lock + cache."""
    dvc(["commit", "--force", "--quiet", *(stages or [])], cwd)


def dvc_push(cwd: str | Path, remote: str | None = None, targets: list[str] | None = None) -> None:
    args = ["push", "--quiet"]
    if remote:
        args += ["--remote", remote]
    dvc(args + (targets or []), cwd)


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def init_workspace(
    dest: str | Path, params: dict[str, Any], *, local_remote: str | Path | None = None
) -> Path:
    """A separate pipeline workspace at ``dest``: this project's dvc.yaml, DVC config and the source files
    the stages declare as deps, the given ``params.yaml``, a git repository with one commit.

    For running the pipeline somewhere other than the checkout (tests, benchmarks, a scratch experiment).
    ``local_remote`` re-points the default ``local`` DVC remote (else it stays ``../runs/dvc-remote``).
    """
    import yaml

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    deps = {
        d for stage in spec["stages"].values() for d in stage.get("deps", []) if not d.startswith("outputs/")
    }
    for rel in sorted({"dvc.yaml", ".dvcignore", ".dvc/config", *deps}):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / rel, dest / rel)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=spf@localhost", "-c", "user.name=spf"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=dest, check=True, capture_output=True)
    if local_remote is not None:
        dvc(["remote", "modify", "local", "url", str(local_remote)], dest)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-q", "-m", "workspace"], cwd=dest, check=True, capture_output=True)
    return dest
