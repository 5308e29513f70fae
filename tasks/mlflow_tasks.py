"""Prefect tasks over :mod:`tasks.tracking` and :mod:`tasks.registry` (MLflow, explicit run ids).

All are I/O against the tracking server: they retry with backoff, and a server that stays down fails the
flow *before* anything is registered (``track_run`` runs first and needs the server).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import task
from prefect.transactions import Transaction

from spf.gate import GateThresholds
from tasks import registry, tracking

logger = logging.getLogger(__name__)

IO_RETRIES = 3
IO_RETRY_DELAYS = [2, 10, 30]


@task(name="mlflow-track", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def track_run_task(
    params: dict[str, Any],
    results: dict[str, dict[str, Any]],
    run_name: str,
    tags: dict[str, Any],
) -> dict[str, Any]:
    """One MLflow run: params, tags, stage metrics, telemetry, artifacts and the adapter as a model."""
    t = params["tracking"]
    workdir = Path(params["runtime"]["workdir"])
    client = tracking.make_client(t["tracking_uri"])
    run_id = tracking.start_run(client, t["experiment"], run_name, tags, repo_dir=".", dvc_lock="dvc.lock")
    try:
        tracking.log_params(client, run_id, params)
        metrics: dict[str, float] = {}
        for stage in ("prepare", "align", "estimate", "finetune"):
            for k, v in results.get(stage, {}).items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    metrics[f"{stage}/{k}"] = float(v)
        metrics.update({k: float(v) for k, v in results["evaluate"].items() if isinstance(v, int | float)})
        tracking.log_metrics(client, run_id, metrics)
        tracking.log_telemetry(client, run_id, workdir / "finetune" / "metrics.json")
        for name in ("subspace.json", "cer.json", "sample.jsonl"):
            path = workdir / "subspace" / name
            if path.exists():
                tracking.log_artifacts(client, run_id, path, "subspace")
        for name in ("results.json", "samples.jsonl"):
            tracking.log_artifacts(client, run_id, workdir / "eval" / name, "eval")
        tracking.log_artifacts(client, run_id, workdir / "data" / "manifest.json", "data")
        base = Path(results["align"]["model_ref"])
        base_ref = str(base.resolve()) if base.exists() else results["align"]["model_ref"]
        model_uri = tracking.log_adapter_model(
            client,
            run_id,
            workdir / "finetune",
            base_ref,
            embed_base=t["embed_base_model"],
            max_new_tokens=params["evaluate"]["max_new_tokens"],
        )
    except Exception:
        tracking.end_run(client, run_id, "FAILED")
        raise
    return {"run_id": run_id, "model_uri": model_uri, "metrics": metrics, "run_url": run_url(client, run_id)}


def run_url(client: Any, run_id: str) -> str:
    uri = client.tracking_uri
    run = client.get_run(run_id)
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"{uri} (run {run_id}; browse with `mlflow ui --backend-store-uri {uri}`)"


@task(name="mlflow-register", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def register_task(params: dict[str, Any], run: dict[str, Any], metrics: dict[str, Any]) -> str:
    """A new version of the registered model, aliased ``challenger``, with its metrics as tags."""
    t = params["tracking"]
    client = tracking.make_client(t["tracking_uri"])
    return registry.register_candidate(
        client,
        t["registered_model"],
        run["model_uri"],
        run["run_id"],
        metrics,
        tags={"method": params["finetune"]["method"], "scenario": params["prepare"]["scenario"]},
    )


# No retries: a retry after the alias moved would judge the candidate against itself. A failure after the
# promotion restores the previous champion here; later failures are undone by the rollback hook below.
@task(name="promotion-gate")
def gate_task(params: dict[str, Any], run: dict[str, Any], version: str) -> dict[str, Any]:
    """Apply the gate; ``champion`` moves only when the candidate passes (compare-and-set)."""
    t = params["tracking"]
    client = tracking.make_client(t["tracking_uri"])
    report_dir = Path(params["runtime"]["workdir"]) / "gate"
    decision = registry.apply_gate(
        client, t["registered_model"], version, GateThresholds.from_dict(params["gate"]), report_dir
    )
    try:
        tracking.log_artifacts(client, run["run_id"], report_dir, "gate")
    except Exception:
        if decision.promote:
            registry.rollback_champion(client, t["registered_model"], decision.champion_version)
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
    # champion_version is the champion the (possibly re-decided) promotion replaced
    registry.rollback_champion(client, t["registered_model"], decision.get("champion_version"))


@task(name="mlflow-finish", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def finish_run_task(params: dict[str, Any], run: dict[str, Any], decision: dict[str, Any]) -> None:
    client = tracking.make_client(params["tracking"]["tracking_uri"])
    tracking.set_tags(
        client,
        run["run_id"],
        {
            "gate.decision": "promoted" if decision["promote"] else "rejected",
            "registry.version": decision["version"],
        },
    )
    tracking.end_run(client, run["run_id"], "FINISHED")
