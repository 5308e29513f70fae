"""Registration + gate + report as one Prefect transaction: a failure after the promotion restores the
previous champion (the gate task's on_rollback hook), against a real MLflow server."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

pytest.importorskip("prefect")  # the optional [pipeline] stack: a core-only install skips this file
pytest.importorskip("mlflow")

from prefect import flow, task
from prefect.transactions import transaction

from tasks import registry, tracking
from tasks.mlflow_tasks import gate_task
from tests.services import mlflow_server_fixture  # noqa: F401  (provides the `mlflow_server` fixture)

pytestmark = pytest.mark.slow  # starts MLflow (and Prefect's ephemeral server) when CI has not


@task
def publish_report(fail: bool) -> None:
    if fail:
        raise RuntimeError("report upload failed")


@flow
def promote(params: dict, run: dict, version: str, fail_after: bool) -> dict:
    with transaction() as txn:
        txn.set("params", params)
        decision = gate_task(params, run, version)
        txn.set("decision", decision)
        publish_report(fail_after)
    return decision


def _setup(uri: str, tmp_path: Path) -> tuple[dict, dict, str, str]:
    client = tracking.make_client(uri)
    name = f"spf-txn-{uuid.uuid4().hex[:8]}"
    run_id = tracking.start_run(client, "spf-txn-test", "txn", {})
    good = {"harmful_rate": 0.05, "overrefusal_rate": 0.1, "utility": 0.8}
    v1 = registry.register_candidate(client, name, f"runs:/{run_id}/m1", run_id, good)
    registry.apply_gate(client, name, v1, registry.GateThresholds(), tmp_path / "g1")
    better = {"harmful_rate": 0.0, "overrefusal_rate": 0.05, "utility": 0.85}
    v2 = registry.register_candidate(client, name, f"runs:/{run_id}/m2", run_id, better)
    params = {
        "tracking": {"tracking_uri": uri, "registered_model": name},
        "runtime": {"workdir": str(tmp_path / "outputs")},
        "gate": registry.GateThresholds().to_dict(),
    }
    return params, {"run_id": run_id}, v1, v2


def test_failure_after_promotion_restores_the_previous_champion(mlflow_server: str, tmp_path: Path):
    params, run, v1, v2 = _setup(mlflow_server, tmp_path)
    client = tracking.make_client(mlflow_server)
    name = params["tracking"]["registered_model"]
    assert registry.champion_version(client, name)[0] == v1
    with pytest.raises(RuntimeError, match="report upload failed"):
        promote(params, run, v2, fail_after=True)
    assert registry.champion_version(client, name)[0] == v1  # rolled back


def test_promotion_commits_when_the_transaction_succeeds(mlflow_server: str, tmp_path: Path):
    params, run, _v1, v2 = _setup(mlflow_server, tmp_path)
    client = tracking.make_client(mlflow_server)
    decision = promote(params, run, v2, fail_after=False)
    assert decision["promote"] is True
    assert registry.champion_version(client, params["tracking"]["registered_model"])[0] == v2
