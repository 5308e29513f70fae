"""DVC from the flow: record stage outputs in ``dvc.lock`` and the cache, push them to a remote.

The flow computes the stages itself (Prefect tasks over ``spf.pipeline.stages``) at exactly the paths ``dvc.yaml``
declares, after writing the run's effective parameters to ``params.yaml`` (what ``dvc exp run -S`` does
too). ``dvc commit`` then records the outputs, so ``dvc.lock`` describes the run, ``dvc repro`` afterwards
has nothing to do, and ``dvc push`` versions the data in the remote (local folder by default, S3 by
configuration). DVC runs as a subprocess: its Python API is not stable and it must not share our process.

Push and pull talk to the remote (S3 in production) and are retried with backoff
(:class:`tasks.resilience.RetryPolicy`, ``SPF_IO_RETRIES`` / ``SPF_IO_RETRY_DELAY`` / ...); when the remote
stays unreachable they fail with :class:`tasks.resilience.ServiceUnavailable` naming the remote, its URL and
endpoint. Inside one attempt DVC's S3 client retries too (botocore: ``AWS_MAX_ATTEMPTS``, default 5 in its
legacy mode, ~12 s against a closed port).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tasks.resilience import RetryPolicy, retry_call

logger = logging.getLogger(__name__)

__all__ = ["DvcError", "dvc", "dvc_commit", "dvc_executable", "dvc_pull", "dvc_push", "remote_location"]


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
        lines = [
            line.strip()
            for line in (proc.stderr + "\n" + proc.stdout).splitlines()
            if line.strip() and not line.startswith("Having any troubles?")
        ]
        raise DvcError(f"dvc {' '.join(args)} failed (exit {proc.returncode}): {' / '.join(lines[-5:])}")
    return proc.stdout


def dvc_commit(cwd: str | Path, stages: list[str] | None = None) -> None:
    """Record the current outputs (and params/deps) of ``stages`` (all when None) in dvc.lock + cache."""
    # no --quiet: it also hides DVC's error message, leaving only its support banner
    dvc(["commit", "--force", *(stages or [])], cwd)


_SECTION = re.compile(r"^\s*\[\s*'?(?P<name>[^\]']+?)'?\s*\]\s*$")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s:]+:[^/@\s]+@")
_KEY = re.compile(r"^\s*(?P<key>[A-Za-z0-9_]+)\s*=\s*(?P<value>.*?)\s*$")


def _dvc_config(cwd: str | Path) -> dict[str, dict[str, str]]:
    """``.dvc/config`` overlaid with ``.dvc/config.local`` (what DVC merges), as {section: {key: value}}."""
    merged: dict[str, dict[str, str]] = {}
    for name in ("config", "config.local"):
        path = Path(cwd) / ".dvc" / name
        if not path.is_file():
            continue
        section = ""
        for line in path.read_text().splitlines():
            if m := _SECTION.match(line):
                section = m.group("name").strip()
            elif (m := _KEY.match(line)) and section:
                merged.setdefault(section, {})[m.group("key")] = m.group("value")
    return merged


def remote_location(cwd: str | Path, remote: str | None = None) -> tuple[str, str]:
    """``(name, "URL via ENDPOINT")`` of ``remote`` (default: the configured default remote), read from
    the workspace's DVC config without starting DVC; credentials in URLs are not shown."""
    config = _dvc_config(cwd)
    name = remote or config.get("core", {}).get("remote") or "?"
    section = config.get(f'remote "{name}"', {})
    where = section.get("url", "(no url)")
    if section.get("endpointurl"):
        where += f" via {section['endpointurl']}"
    return name, _USERINFO.sub(r"\g<scheme>***@", where)


def _transfer(
    verb: str,
    cwd: str | Path,
    remote: str | None,
    targets: list[str] | None,
    policy: RetryPolicy | None,
    timeout: float,
) -> None:
    args = [verb]
    if remote:
        args += ["--remote", remote]
    name, where = remote_location(cwd, remote)
    retry_call(
        lambda: dvc(args + (targets or []), cwd, timeout=timeout),
        service=f"DVC remote {name!r} (dvc {verb})",
        endpoint=where,
        policy=policy or RetryPolicy.from_env(),
        retry_on=(DvcError, subprocess.TimeoutExpired),
    )


def dvc_push(
    cwd: str | Path,
    remote: str | None = None,
    targets: list[str] | None = None,
    *,
    policy: RetryPolicy | None = None,
    timeout: float = 600,
) -> None:
    """``dvc push`` with retries (``policy``, default from ``SPF_IO_*``); ServiceUnavailable naming the
    remote when every attempt fails. Pushing is idempotent: a retry sends only what is still missing."""
    _transfer("push", cwd, remote, targets, policy, timeout)


def dvc_pull(
    cwd: str | Path,
    remote: str | None = None,
    targets: list[str] | None = None,
    *,
    policy: RetryPolicy | None = None,
    timeout: float = 600,
) -> None:
    """``dvc pull`` with the same retries as :func:`dvc_push`."""
    _transfer("pull", cwd, remote, targets, policy, timeout)


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
        if (PROJECT_ROOT / rel).is_dir():  # a code folder (dvc.yaml names the folders a stage runs)
            shutil.copytree(PROJECT_ROOT / rel, dest / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(PROJECT_ROOT / rel, dest / rel)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=spf@localhost", "-c", "user.name=spf"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=dest, check=True, capture_output=True)
    if local_remote is not None:
        dvc(["remote", "modify", "local", "url", str(local_remote)], dest)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-q", "-m", "workspace"], cwd=dest, check=True, capture_output=True)
    return dest
