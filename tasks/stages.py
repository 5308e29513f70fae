"""Prefect tasks: thin wrappers over ``spf.pipeline.stages`` stages, DVC and MLflow.

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

from spf.io import atomic_path, file_sha256, path_sha256
from spf.pipeline.params import ParamsError, PipelineParams
from spf.pipeline.stages import STAGE_TABLE, run_stage
from tasks import dvc_ops
from tasks.resilience import RetryPolicy

logger = logging.getLogger(__name__)

# Local I/O (params.yaml): a couple of quick retries. Remote I/O retries inside dvc_ops (SPF_IO_* policy).
IO_RETRY = RetryPolicy(retries=2, delay=1.0, backoff=2.0)


STAMP = ".spf-cache-key"  # written into a stage's output folder: the input key it was computed from


def _lookup(params: dict[str, Any], dotted: str) -> Any:
    """A section (``prepare``) or one key in it (``align.refusals``), as DVC's ``params:`` names them."""
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def input_key(stage: str, params: dict[str, Any]) -> str:
    """SHA-256 of the stage's parameter section(s) and the bytes of its input folders."""
    row = STAGE_TABLE[stage]
    workdir = Path(params["runtime"]["workdir"])
    payload = {
        "stage": stage,
        "params": {s: _lookup(params, s) for s in (*row.params, *row.also_reads)},
        "inputs": {n: path_sha256(workdir / n) if (workdir / n).exists() else "missing" for n in row.inputs},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def output_matches(stage: str, params: dict[str, Any], key: str) -> bool:
    """Whether the output on disk was produced from inputs with this key (its stamp says so)."""
    stamp = Path(params["runtime"]["workdir"]) / STAGE_TABLE[stage].output / STAMP
    return stamp.is_file() and stamp.read_text().strip() == key


def _cache_key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"spf-{parameters['stage']}-{input_key(parameters['stage'], parameters['params'])}"


def run_stage_task(stage: str, params: dict[str, Any]) -> dict[str, Any]:
    """Call :func:`stage_task`, reusing a cached result only while the output on disk is that result.

    Outputs live at fixed paths (the DVC outs), so a run with other parameters may have overwritten them
    since the cached run, or someone deleted them. The stamp written into the output folder records which
    input key produced it; when it does not match, the cache is refreshed (the stage runs and its new
    result replaces the record) instead of returning a path to the wrong data.
    """
    fresh = output_matches(stage, params, input_key(stage, params))
    return stage_task.with_options(refresh_cache=not fresh)(stage, params)


@task(
    name="spf-stage",
    task_run_name="{stage}",
    cache_key_fn=_cache_key_fn,
    persist_result=True,
    log_prints=True,
)
def stage_task(stage: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one pipeline stage (spf.pipeline.stages.run_stage) with the run's effective parameters."""
    key = input_key(stage, params)  # before the run: the inputs it reads
    result = run_stage(stage, PipelineParams.from_dict(params, source="flow parameters"))
    (Path(params["runtime"]["workdir"]) / STAGE_TABLE[stage].output / STAMP).write_text(key + "\n")
    return result


@task(name="write-params", **IO_RETRY.prefect_options())
def write_params_task(params: dict[str, Any], path: str = "params.yaml") -> str:
    """The run's effective parameters → params.yaml (as `dvc exp run -S` does); see :func:`write_params`."""
    return write_params(params, path)


def write_params(params: dict[str, Any], path: str | Path = "params.yaml") -> str:
    """Write the effective parameters to ``path`` atomically, keeping its comments and key order.

    Left untouched when it already spells out exactly these parameters — every section included: DVC
    requires each section a stage declares to be present in the file, defaults or not. Otherwise only the
    values that differ are edited in place (ruamel round-trip, which DVC itself depends on), so a run with
    overrides does not strip the documented file; a missing or unparsable file is written fresh.
    """
    import io

    import yaml
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError as RuamelError

    path = Path(path)
    rt = YAML()  # round-trip: comments and order survive
    rt.width = 4096
    doc = None
    try:
        if path.exists():
            if yaml.safe_load(path.read_text()) == params:
                return str(path)
            doc = rt.load(path.read_text())
    except (yaml.YAMLError, RuamelError):
        doc = None  # an invalid file is replaced by the valid effective parameters
    if isinstance(doc, dict):
        _update_in_place(doc, params)
        buf = io.StringIO()
        rt.dump(doc, buf)
        text = buf.getvalue()
    else:
        text = (
            "# written by the spf-pipeline flow: the effective parameters of its last run\n"
            + yaml.safe_dump(params, sort_keys=False)
        )
    with atomic_path(path, tracked_ok=True) as tmp:  # params.yaml is tracked and rewritten on purpose
        tmp.write_text(text)
    return str(path)


def overridden(original: bytes | None, params: dict[str, Any]) -> bool:
    """Whether ``params`` differ in value from what the original params.yaml (with defaults) says."""
    import yaml

    try:
        base = yaml.safe_load(original.decode()) if original is not None else {}
        return PipelineParams.from_dict(base or {}, source="params.yaml").to_dict() != params
    except (ParamsError, yaml.YAMLError, UnicodeDecodeError):
        return True


def restore_params(path: str | Path, original: bytes | None) -> None:
    """Put back the params.yaml a run started from (``original``: its bytes; None = there was none)."""
    path = Path(path)
    if original is None:
        path.unlink(missing_ok=True)
        return
    with atomic_path(path, tracked_ok=True) as tmp:  # params.yaml is tracked and rewritten on purpose
        tmp.write_bytes(original)


def _update_in_place(doc: dict, new: dict) -> None:
    """Make ``doc`` (a ruamel CommentedMap) equal ``new``: nested maps edited key by key, so the comments
    attached to untouched keys — and to edited ones — stay where they are."""
    for key in [k for k in doc if k not in new]:
        del doc[key]
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            _update_in_place(doc[key], value)
        elif key not in doc or doc[key] != value:
            doc[key] = value


# No Prefect retries: `dvc commit` is local and deterministic, and dvc_push retries the remote itself
# (SPF_IO_RETRIES / SPF_IO_RETRY_DELAY / ...); retrying here too would multiply the attempts.
@task(name="dvc-version")
def dvc_version_task(stages: list[str], remote: str | None, push: bool = True) -> dict[str, Any]:
    """Record ``stages``' outputs in dvc.lock and the DVC cache; push them to ``remote`` (retried with
    backoff; a remote that stays down fails the run with an error naming it, before anything is tracked)."""
    dvc_ops.dvc_commit(".", stages)
    if push:
        dvc_ops.dvc_push(".", remote, stages)
    lock = Path("dvc.lock")
    return {
        "stages": stages,
        "remote": remote,
        "dvc_lock_sha256": file_sha256(lock) if lock.exists() else None,  # = the MLflow run's dvc.lock tag
    }
