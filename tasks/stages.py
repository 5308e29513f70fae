"""Prefect tasks: thin wrappers over ``spf.pipeline`` stages, DVC and MLflow.

Tasks take and return small JSON-able values (parameter dicts, paths, metrics) — never models — so their
results can be persisted and cached. Stage tasks are cached on a key made of content hashes
(:func:`stage_cache_key`): the stage's parameter section, the bytes of its inputs AND the bytes currently
at its output path. Including the output hash means a cache hit is only possible while the output on disk
is still the one the cached run produced; a run with other parameters that overwrote it makes the next run
recompute instead of returning a path to the wrong data. I/O tasks (DVC push, MLflow, the registry) retry
with backoff; compute tasks do not (a retry would only repeat a deterministic failure).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from spf.params import PipelineParams
from spf.pipeline import path_sha256, run_stage
from tasks import dvc_ops

logger = logging.getLogger(__name__)

# stage → (parameter sections it reads, input folders under workdir, output folder under workdir)
STAGE_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "prepare": (("prepare",), (), "data"),
    "align": (("align",), (), "aligned"),
    "estimate": (("estimate",), ("aligned", "data"), "subspace"),
    "finetune": (("finetune", "estimate"), ("aligned", "data", "subspace"), "finetune"),
    "evaluate": (("evaluate",), ("aligned", "data", "finetune"), "eval"),
}

IO_RETRIES = 3
IO_RETRY_DELAYS = [2, 10, 30]


def _hash_or_missing(path: Path) -> str:
    return path_sha256(path) if path.exists() else "missing"


def stage_cache_key(stage: str, params: dict[str, Any]) -> str:
    sections, inputs, output = STAGE_IO[stage]
    workdir = Path(params["runtime"]["workdir"])
    payload = {
        "stage": stage,
        "params": {s: params[s] for s in sections},
        "inputs": {name: _hash_or_missing(workdir / name) for name in inputs},
        "output": _hash_or_missing(workdir / output),
    }
    if payload["output"] == "missing":
        # nothing on disk to reuse: a unique key forces a run (a stale record would point at nothing)
        payload["nonce"] = str(id(payload))
    return f"spf-{stage}-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cache_key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return stage_cache_key(parameters["stage"], parameters["params"])


@task(
    name="spf-stage",
    task_run_name="{stage}",
    cache_key_fn=_cache_key_fn,
    persist_result=True,
    log_prints=True,
)
def stage_task(stage: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one pipeline stage (spf.pipeline.run_stage) with the run's effective parameters."""
    return run_stage(stage, PipelineParams.from_dict(params, source="flow parameters"))


@task(name="write-params", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def write_params_task(params: dict[str, Any], path: str = "params.yaml") -> str:
    """The run's effective parameters → params.yaml (as `dvc exp run -S` does), atomically.

    Left untouched (comments and all) when it already holds exactly these parameters.
    """
    import yaml

    from spf.io import atomic_path
    from spf.params import ParamsError, load_params

    try:
        if Path(path).exists() and load_params(path).to_dict() == params:
            return path
    except ParamsError:
        pass  # an invalid file is replaced by the valid effective parameters

    with atomic_path(path) as tmp:
        tmp.write_text(
            "# written by the spf-pipeline flow: the effective parameters of its last run\n"
            + yaml.safe_dump(params, sort_keys=False)
        )
    return path


@task(name="dvc-version", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def dvc_version_task(stages: list[str], remote: str | None, push: bool = True) -> dict[str, Any]:
    """Record ``stages``' outputs in dvc.lock and the DVC cache; push them to ``remote``."""
    dvc_ops.dvc_commit(".", stages)
    if push:
        dvc_ops.dvc_push(".", remote, stages)
    lock = Path("dvc.lock")
    return {
        "stages": stages,
        "remote": remote,
        "dvc_lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else None,
    }
