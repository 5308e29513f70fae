"""Outages of the real services, on servers of this module's own (free ports, killed and restarted here;
the shared CI ones are never touched).

* S3 down: ``dvc push`` to the S3 remote retries with growing delays, then fails naming the remote and
  its endpoint; after S3 returns the same push succeeds. The MLflow step that uploads artifacts through
  the proxying server retries too and names the artifact store; after S3 returns a rerun tracks fully.
* MLflow down between tracking and registration: the run fails at registration, before the gate —
  no new version, no alias moved, champion unchanged; after the server returns a rerun registers and
  gates normally. A registration attempt that died half-way is completed, not duplicated, by the retry.
* MLflow unreachable from the start: the real ``spf-pipeline`` flow fails in its preflight, in seconds,
  before any stage runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prefect")  # the optional [pipeline] stack: a core-only install skips this file
pytest.importorskip("mlflow")

from prefect import flow

from spf.pipeline.gate import GateThresholds
from tasks import dvc_ops, registry, tracking
from tasks.resilience import RetryPolicy, ServiceUnavailable
from tests.services import Services, free_port

pytestmark = pytest.mark.slow  # starts (and restarts) S3 + MLflow servers

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# botocore's own retries (5 attempts in its legacy mode, ~12 s against a closed port) would only slow the
# tests down: DVC (client side) and the MLflow server try S3 once per attempt here; our retries are tested.
ONE_S3_ATTEMPT = {"AWS_MAX_ATTEMPTS": "1"}
GOOD = {"harmful_rate": 0.05, "overrefusal_rate": 0.10, "utility": 0.80}
BETTER = {"harmful_rate": 0.00, "overrefusal_rate": 0.05, "utility": 0.85}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory):
    services = Services(
        tmp_path_factory.mktemp("outage-services"), ("s3", "mlflow"), {**AWS, **ONE_S3_ATTEMPT}
    )
    try:
        services.start()
        yield services
    finally:
        services.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {**AWS, **ONE_S3_ATTEMPT}.items():
        monkeypatch.setenv(k, v)


# ------------------------------------------------------------------------------------------- S3 / DVC


def _dvc_workspace(root: Path, endpoint: str) -> Path:
    ws = root / "ws"
    ws.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    for args in (
        ["init", "-q"],
        ["remote", "add", "-d", "s3", f"s3://dvc/{root.name}"],
        ["remote", "modify", "--local", "s3", "endpointurl", endpoint],
    ):
        subprocess.run([str(BIN / "dvc"), *args], cwd=ws, check=True, capture_output=True)
    (ws / "data.txt").write_text("versioned data\n")
    subprocess.run([str(BIN / "dvc"), "add", "-q", "data.txt"], cwd=ws, check=True, capture_output=True)
    return ws


def test_dvc_push_retries_with_backoff_then_succeeds_after_s3_returns(
    svc: Services, s3_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    endpoint = svc.urls["AWS_ENDPOINT_URL"]
    ws = _dvc_workspace(tmp_path, endpoint)
    attempts: list[tuple[float, float]] = []
    real = dvc_ops.dvc

    def timed(args, cwd, timeout=600):
        t0 = time.monotonic()
        try:
            return real(args, cwd, timeout=timeout)
        finally:
            attempts.append((t0, time.monotonic()))

    monkeypatch.setattr(dvc_ops, "dvc", timed)
    policy = RetryPolicy(retries=3, delay=0.5, backoff=2.0)  # waits 0.5, 1, 2 s
    svc.stop("s3")
    try:
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable) as failed:
            dvc_ops.dvc_push(ws, "s3", ["data.txt.dvc"], policy=policy)
        took = time.monotonic() - t0
    finally:
        svc.start("s3")
    message = str(failed.value)
    assert "DVC remote 's3' (dvc push)" in message and endpoint in message, message
    assert f"s3://dvc/{tmp_path.name}" in message and "after 4 attempts" in message, message
    assert "Could not connect to the endpoint URL" in message, message  # DVC's own reason, kept
    assert len(attempts) == policy.attempts == 4
    gaps = [attempts[i + 1][0] - attempts[i][1] for i in range(3)]
    assert all(g >= d for g, d in zip(gaps, policy.delays(), strict=True)), gaps
    assert gaps[0] < gaps[1] < gaps[2], gaps
    print(
        f"dvc push, S3 down: {len(attempts)} attempts, waits {[round(g, 2) for g in gaps]} s, failed after {took:.1f} s"
    )

    # S3 is back (empty buckets re-created by services.sh): the same push succeeds and the data is there
    attempts.clear()
    dvc_ops.dvc_push(ws, "s3", ["data.txt.dvc"], policy=policy)
    assert len(attempts) == 1
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    assert s3.list_objects_v2(Bucket="dvc", Prefix=tmp_path.name).get("KeyCount", 0) == 1


# ------------------------------------------------------------------------------------ MLflow tasks


def test_restarting_the_services_keeps_mlflow_artifacts_and_dvc_objects(
    svc: Services, s3_env: None, tmp_path: Path
):
    # SeaweedFS keeps its objects on disk: after every service is stopped and started again, MLflow's
    # SQLite still points at artifacts that exist and DVC pulls what it pushed (moto lost both)
    from mlflow.tracking import MlflowClient

    ws = _dvc_workspace(tmp_path, svc.urls["AWS_ENDPOINT_URL"])
    dvc_ops.dvc_push(ws, "s3", ["data.txt.dvc"])
    uri = svc.urls["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment(f"persist-{uuid.uuid4().hex[:8]}")).info.run_id
    client.log_text(run, "kept across a restart\n", "notes/kept.txt")

    svc.stop()
    svc.start()

    client = MlflowClient(tracking_uri=uri)
    got = Path(client.download_artifacts(run, "notes/kept.txt", str(tmp_path)))
    assert got.read_text() == "kept across a restart\n"
    subprocess.run(["rm", "-rf", str(ws / ".dvc" / "cache"), str(ws / "data.txt")], check=True)
    dvc_ops.dvc_pull(ws, "s3", ["data.txt.dvc"])
    assert (ws / "data.txt").read_text() == "versioned data\n"


def test_s3_checks_credentials(svc: Services):
    # a real S3 server: a wrong key is refused (moto accepts any)
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=svc.urls["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="not-the-key", aws_secret_access_key="wrong")  # fmt: skip
    with pytest.raises(ClientError, match=r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied"):
        s3.list_objects_v2(Bucket="dvc")
    good = boto3.client("s3", endpoint_url=svc.urls["AWS_ENDPOINT_URL"], **{k.lower(): v for k, v in AWS.items() if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")  # fmt: skip
    assert {b["Name"] for b in good.list_buckets()["Buckets"]} >= {"mlflow", "dvc"}


def _candidate(tmp: Path, uri: str, name: str, metrics: dict[str, float]) -> tuple[dict, dict]:
    """Pipeline parameters and stage results pointing at small hand-made stage outputs (the tracking
    step only reads files; what they contain does not matter here)."""
    wd = tmp / "outputs"
    for sub in ("finetune", "eval", "data", "subspace"):
        (wd / sub).mkdir(parents=True, exist_ok=True)
    (wd / "finetune" / "adapter_config.json").write_text("{}")
    (wd / "finetune" / "metrics.json").write_text(
        json.dumps({"steps": [{"step": 0, "loss": 1.0}], "evals": [], "summary": {"steps": 1}})
    )
    (wd / "eval" / "results.json").write_text(json.dumps(metrics))
    (wd / "eval" / "samples.jsonl").write_text("{}\n")
    (wd / "data" / "manifest.json").write_text("{}")
    params = {
        "tracking": {
            "tracking_uri": uri,
            "experiment": f"{name}-exp",
            "registered_model": name,
            "embed_base_model": False,
        },
        "runtime": {"workdir": str(wd)},
        "prepare": {"scenario": "sentiment"},
        "align": {"model": "tiny-llama"},
        "estimate": {"rank": 2},
        "finetune": {"method": "spf"},
        "evaluate": {"max_new_tokens": 4},
        "gate": GateThresholds().to_dict(),
    }
    results = {"align": {"model_ref": "tiny-llama"}, "finetune": {"steps": 1}, "evaluate": dict(metrics)}
    return params, results


@flow(name="outage-track")
def track_flow(params: dict, results: dict, retries: int, delays: list[float]) -> dict:
    from tasks.mlflow_tasks import track_run_task

    task = track_run_task.with_options(retries=retries, retry_delay_seconds=delays)
    return task(params, results, "outage", {})


@flow(name="outage-promote")
def promote_flow(params: dict, run: dict, metrics: dict) -> dict:
    from flows.pipeline import register_and_gate

    version, decision, _ = register_and_gate(params, run, metrics)
    return {"version": version, **decision}


def _runs(client: Any, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return (
        [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    )


def test_artifact_upload_with_s3_down_retries_names_the_store_and_reruns(
    svc: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    uri = svc.urls["MLFLOW_TRACKING_URI"]
    client = tracking.make_client(uri)
    name = f"spf-outage-{uuid.uuid4().hex[:8]}"
    params, results = _candidate(tmp_path, uri, name, GOOD)
    svc.stop("s3")
    try:
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable) as failed:
            track_flow(params, results, 2, [0.5, 1.0])
        took = time.monotonic() - t0
    finally:
        svc.start("s3")
    message = str(failed.value)
    assert "artifact store (S3) behind the MLflow server" in message and uri in message, message
    runs = _runs(client, params["tracking"]["experiment"])
    assert [r.info.status for r in runs] == ["FAILED"] * 3  # 1 + 2 retries, each closed as FAILED
    print(f"MLflow artifact upload, S3 down: 3 attempts, failed after {took:.1f} s")

    run = track_flow(params, results, 0, [])  # S3 back: the rerun tracks everything
    assert {"eval", "plots"} <= {a.path for a in client.list_artifacts(run["run_id"])}
    assert client.get_logged_model(run["model_uri"].removeprefix("models:/")).source_run_id == run["run_id"]


def test_mlflow_down_between_tracking_and_registration(svc: Services, tmp_path: Path):
    uri = svc.urls["MLFLOW_TRACKING_URI"]
    client = tracking.make_client(uri)
    name = f"spf-outage-{uuid.uuid4().hex[:8]}"
    # an existing champion
    seed_run = tracking.start_run(client, f"{name}-seed", "champion", {})
    v1 = registry.register_candidate(client, name, f"runs:/{seed_run}/m", seed_run, GOOD)
    assert registry.apply_gate(client, name, v1, GateThresholds(), tmp_path / "g1").promote

    params, results = _candidate(tmp_path, uri, name, BETTER)
    run = track_flow(params, results, 0, [])
    svc.stop("mlflow")
    try:
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable) as failed:
            promote_flow(params, run, BETTER)
        took = time.monotonic() - t0
    finally:
        svc.start("mlflow")
    message = str(failed.value)
    assert "MLflow tracking server (register the model version; unreachable)" in message, message
    assert uri in message
    print(f"registration, MLflow down: failed after {took:.1f} s (default SPF_IO_* and MLflow HTTP retries)")

    # nothing half-registered, nothing moved
    assert [mv.version for mv in client.search_model_versions(f"name='{name}'")] == [v1]
    assert dict(client.get_registered_model(name).aliases) == {"champion": v1, "challenger": v1}
    with pytest.raises(Exception, match=r"RESOURCE_DOES_NOT_EXIST|not found"):
        client.get_registered_model(f"{name}{registry.LOCK_SUFFIX}")

    # the server is back: the rerun registers and gates normally
    out = promote_flow(params, run, BETTER)
    assert out["promote"] is True and out["champion_version"] == v1
    assert registry.champion_version(client, name)[0] == out["version"] != v1
    finished = client.get_run(run["run_id"])
    assert finished.info.status == "FINISHED" and finished.data.tags["gate.decision"] == "promoted"


def test_registration_retry_completes_a_half_registered_version(svc: Services, tmp_path: Path):
    """A first attempt created the version and lost the server before setting ``challenger``: the retry
    (same run and model) completes that version instead of registering a second one."""
    from tasks.mlflow_tasks import register_task

    uri = svc.urls["MLFLOW_TRACKING_URI"]
    client = tracking.make_client(uri)
    name = f"spf-half-{uuid.uuid4().hex[:8]}"
    run_id = tracking.start_run(client, f"{name}-exp", "half", {})
    run = {"run_id": run_id, "model_uri": f"runs:/{run_id}/model"}
    client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    half = client.create_model_version(
        name, source, run_id, tags={registry.REGISTRATION_KEY_TAG: f"{run_id}:{run['model_uri']}"}
    ).version
    params, _ = _candidate(tmp_path, uri, name, GOOD)
    version = register_task.fn(params, run, GOOD)
    assert version == str(half)
    assert [mv.version for mv in client.search_model_versions(f"name='{name}'")] == [str(half)]
    assert client.get_registered_model(name).aliases == {"challenger": str(half)}
    assert register_task.fn(params, run, GOOD) == str(half)  # and again: still one version


def test_pipeline_fails_in_seconds_when_mlflow_is_unreachable_from_the_start(tmp_path: Path):
    from spf.pipeline.presets import smoke_params

    ws = dvc_ops.init_workspace(tmp_path / "ws", smoke_params(), local_remote=tmp_path / "remote")
    dead = f"http://127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": dead,
        "SPF_IO_RETRY_DELAY": "0.5",  # 2 retries after 0.5 s and 2 s
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--workspace", str(ws)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "MLflow tracking server (preflight: list experiments; unreachable)" in out, out[-3000:]
    assert dead in out
    assert not (ws / "outputs").exists()  # no stage ran
    print(f"pipeline, MLflow unreachable from the start: failed after {took:.1f} s (incl. Prefect start-up)")
