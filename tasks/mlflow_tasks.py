"""Prefect tasks over :mod:`tasks.tracking` and :mod:`tasks.registry` (MLflow, explicit run ids).

All are I/O against the tracking server: they retry with backoff, and a server that stays down fails the
flow *before* anything is registered (``track_run`` runs first and needs the server).

Retries: each MLflow request retries itself (bounded by :func:`tasks.resilience.apply_mlflow_http_defaults`,
~2 s against a dead server); each task then retries ``SPF_IO_RETRIES`` times (default 2) after
``SPF_IO_RETRY_DELAY`` × ``SPF_IO_RETRY_BACKOFF`` ^ i seconds (default 2 s, 8 s) — read when this module is
imported. A server that stays down fails the step with :class:`tasks.resilience.ServiceUnavailable`
naming it (the tracking server, or the S3 artifact store behind it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import task
from prefect.transactions import Transaction

from spf.pipeline.gate import GateThresholds, is_abort_key
from spf.pipeline.inputs import manifest_inputs
from spf.pipeline.stages import STAGE_TABLE, STAGES
from tasks import registry, tracking
from tasks.resilience import RetryPolicy, describe_mlflow_failure, is_mlflow_outage

logger = logging.getLogger(__name__)

IO_RETRY = RetryPolicy.from_env()


class _Step:
    """``with step("upload artifacts"):`` turns an MLflow outage inside into a ServiceUnavailable that
    names the service (tracking server or its artifact store) and the endpoint; other errors pass."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.what = "connect"

    def __call__(self, what: str) -> _Step:
        self.what = what
        return self

    def __enter__(self) -> _Step:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and isinstance(exc, Exception) and is_mlflow_outage(exc):
            raise describe_mlflow_failure(self.client.tracking_uri, self.what, exc) from exc


@task(name="mlflow-preflight", **IO_RETRY.prefect_options())
def preflight_task(params: dict[str, Any]) -> str:
    """One cheap request to the tracking server before any work: an unreachable server fails the run in
    seconds, before hours of training whose result could not be tracked or registered."""
    client = tracking.make_client(params["tracking"]["tracking_uri"])
    with _Step(client)("preflight: list experiments"):
        client.search_experiments(max_results=1)
    return client.tracking_uri


@task(name="mlflow-track", **IO_RETRY.prefect_options())
def track_run_task(
    params: dict[str, Any],
    results: dict[str, dict[str, Any]],
    run_name: str,
    tags: dict[str, Any],
) -> dict[str, Any]:
    """One MLflow run: params, tags, stage metrics, telemetry, artifacts and the adapter as a model."""
    t = params["tracking"]
    workdir = Path(params["runtime"]["workdir"])
    folder = {name: workdir / row.output for name, row in STAGE_TABLE.items()}  # each stage's output
    client = tracking.make_client(t["tracking_uri"])
    step = _Step(client)
    with step("create the run"):
        run_id = tracking.start_run(
            client, t["experiment"], run_name, tags, repo_dir=".", dvc_lock="dvc.lock"
        )
    try:
        with step("log params"):
            tracking.log_params(client, run_id, params)
        metrics = stage_metrics(results, folder["finetune"] / "metrics.json")
        with step("log metrics"):
            tracking.log_metrics(client, run_id, metrics)
            tracking.set_tags(client, run_id, abort_tags(results))
        with step("log telemetry and upload its artifacts"):
            tracking.log_telemetry(client, run_id, folder["finetune"] / "metrics.json")
        with step("record the data manifest"):
            tracking.log_data_manifest(client, run_id, folder["prepare"] / "manifest.json", "dvc.lock")
        with step("upload artifacts"):
            _log_stage_artifacts(client, run_id, folder)
        base = Path(results["align"]["model_ref"])
        base_ref = str(base.resolve()) if base.exists() else results["align"]["model_ref"]
        with step("upload the model artifact"):
            model_uri = tracking.log_adapter_model(
                client,
                run_id,
                folder["finetune"],
                base_ref,
                embed_base=t["embed_base_model"],
                max_new_tokens=params["evaluate"]["max_new_tokens"],
            )
        with step("read the run back"):
            url = run_url(client, run_id)
    except Exception:
        try:  # best effort: with the server down this fails too, and must not hide the real error
            tracking.end_run(client, run_id, "FAILED")
        except Exception as exc:
            logger.warning("could not mark MLflow run %s FAILED: %s", run_id, str(exc).splitlines()[0][:200])
        raise
    return {"run_id": run_id, "model_uri": model_uri, "metrics": metrics, "run_url": url}


def abort_tags(results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Abort entries (``aborted``, ``abort_reason``) of any stage that are not numbers, as run tags
    ``metric.<stage>/<key>``: an MLflow metric must be a number, and a text reason dropped from the run
    would leave no record of why the run stopped."""
    return {
        f"{registry.METRIC_TAG_PREFIX}{stage}/{k}": registry.metric_tag_value(v)
        for stage, out in results.items()
        for k, v in (out or {}).items()
        if is_abort_key(k) and not (isinstance(v, int | float) and not isinstance(v, bool))
    }


def _log_stage_artifacts(client: Any, run_id: str, folder: dict[str, Path]) -> None:
    """The stage outputs a reader of the run wants, each under its output folder's name."""

    def log(stage: str, path: Path) -> None:
        tracking.log_artifacts(client, run_id, path, STAGE_TABLE[stage].output)

    for name in ("subspace.json", "cer.json", "sample.jsonl"):
        if (folder["estimate"] / name).exists():
            log("estimate", folder["estimate"] / name)
    for name in ("results.json", "samples.jsonl"):
        log("evaluate", folder["evaluate"] / name)
    log("prepare", folder["prepare"] / "manifest.json")
    if (folder["analyze"] / "analysis.json").is_file():  # insights I–III: figures, numbers, summary
        for path in sorted(folder["analyze"].iterdir()):
            if path.suffix in (".png", ".json", ".md"):
                log("analyze", path)


def run_url(client: Any, run_id: str) -> str:
    uri = client.tracking_uri
    run = client.get_run(run_id)
    if uri.startswith("http"):
        # MLflow 3.17's UI opens in its GenAI view unless told (a per-browser setting, not the experiment's
        # kind tag): the query string picks the model-training view for whoever follows the link
        base = f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
        return f"{base}?workflowType=machine_learning"
    return f"{uri} (run {run_id}; browse with `mlflow ui --backend-store-uri {uri}`)"


def stage_metrics(results: dict[str, dict[str, Any]], telemetry_json: Path) -> dict[str, float]:
    """Each stage's numbers as ``<stage>/<key>``; evaluate's unprefixed (the gate's names) but its
    ``seconds``; none twice: the fine-tuning values that log_telemetry records as ``summary/<key>`` (the
    same numbers, from metrics.json) are not repeated as ``finetune/<key>``."""
    summary = json.loads(telemetry_json.read_text()).get("summary", {}) if telemetry_json.is_file() else {}
    metrics: dict[str, float] = {}
    for stage in STAGES:
        for k, v in results.get(stage, {}).items():
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if stage == "finetune" and k in summary:
                continue
            metrics[k if stage == "evaluate" and k != "seconds" else f"{stage}/{k}"] = float(v)
    return metrics


@task(name="mlflow-register", **IO_RETRY.prefect_options())
def register_task(params: dict[str, Any], run: dict[str, Any], metrics: dict[str, Any]) -> str:
    """A new version of the registered model, aliased ``challenger``, with its metrics as tags.

    Idempotent per (run, model): a retry after a server failure mid-registration completes the version
    the failed attempt created instead of adding a duplicate."""
    t = params["tracking"]
    client = tracking.make_client(t["tracking_uri"])
    with _Step(client)("register the model version"):
        return registry.register_candidate(
            client,
            t["registered_model"],
            run["model_uri"],
            run["run_id"],
            metrics,
            tags={"method": params["finetune"]["method"], "scenario": params["prepare"]["scenario"]},
            idempotency_key=f"{run['run_id']}:{run['model_uri']}",
        )


def data_inputs(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The prepare stage's data/manifest.json ``inputs`` (none when the file is absent)."""
    return manifest_inputs(Path(params["runtime"]["workdir"]) / STAGE_TABLE["prepare"].output)


def card_facts(params: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """What the model card says the version is: base, method, scenario, judge, run, fine-tuning settings.
    A section the caller did not pass (a gate applied to a version registered elsewhere) is left out."""

    def section(name: str) -> dict[str, Any]:
        return params.get(name) or {}

    facts = {
        "base_model": section("align").get("model"),
        "method": section("finetune").get("method"),
        "scenario": section("prepare").get("scenario"),
        "judge": section("evaluate").get("judge"),
        "run_id": run.get("run_id"),
        "settings": section("finetune") or None,
    }
    return {k: v for k, v in facts.items() if v is not None}


# No retries: a retry after the alias moved would judge the candidate against itself. A failure after the
# promotion restores the previous champion here; later failures are undone by the rollback hook below.
@task(name="promotion-gate")
def gate_task(params: dict[str, Any], run: dict[str, Any], version: str) -> dict[str, Any]:
    """Apply the gate under the registry's promotion lock; ``champion`` moves only when the candidate
    passes against the champion current inside the lock."""
    t = params["tracking"]
    client = tracking.make_client(t["tracking_uri"])
    report_dir = Path(params["runtime"]["workdir"]) / "gate"
    with _Step(client)("gate and promote"):
        decision = registry.apply_gate(
            client,
            t["registered_model"],
            version,
            GateThresholds.from_dict(params["gate"]),
            report_dir,
            data=data_inputs(params),
            about=card_facts(params, run),
        )
    try:
        with _Step(client)("upload the gate report"):
            tracking.log_artifacts(client, run["run_id"], report_dir, "gate")
    except Exception:
        if decision.promote:
            registry.rollback_champion(
                client, t["registered_model"], decision.champion_version, promoted_version=version
            )
        raise
    out = {"version": version, **decision.to_dict()}
    return json.loads(json.dumps(out, default=str))


@gate_task.on_rollback
def _restore_champion(txn: Transaction) -> None:
    """A later step of the promotion transaction failed: put ``champion`` back where it was."""
    decision = txn.get("decision")
    params = txn.get("params")
    if not decision or not decision.get("promote"):
        return
    t = params["tracking"]
    client = tracking.make_client(t["tracking_uri"])
    # champion_version is the champion the (possibly re-decided) promotion replaced; a promotion by another
    # run since ours is kept (rollback only while champion is still our version)
    registry.rollback_champion(
        client,
        t["registered_model"],
        decision.get("champion_version"),
        promoted_version=decision.get("version"),
    )


@task(name="mlflow-finish", **IO_RETRY.prefect_options())
def finish_run_task(params: dict[str, Any], run: dict[str, Any], decision: dict[str, Any]) -> None:
    client = tracking.make_client(params["tracking"]["tracking_uri"])
    with _Step(client)("close the run"):
        _finish(client, run, decision)


def _finish(client: Any, run: dict[str, Any], decision: dict[str, Any]) -> None:
    tracking.set_tags(
        client,
        run["run_id"],
        {
            "gate.decision": decision.get("outcome") or ("promoted" if decision["promote"] else "rejected"),
            "registry.version": decision["version"],
        },
    )
    tracking.end_run(client, run["run_id"], "FINISHED")
