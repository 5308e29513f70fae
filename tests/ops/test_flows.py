"""The Prefect pipeline end to end on a tiny random model against REAL Prefect, MLflow and S3 servers.

Servers: the ``local_services`` fixture (tests/services.py) — the ones CI started with
``scripts/services.sh`` (PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL in the environment), else
its own on free ports. Flows run in subprocesses (``python -m flows.pipeline``), as a user runs them:
Prefect reads its settings at import.

Covered: a candidate failing the safety threshold is never promoted; a second, better one replaces the
champion; the champion loads from ``models:/NAME@champion`` and answers; a deployment triggered through
the API (the GPU fine-tuning deployment, called by the pipeline with ``run_deployment``) runs on a worker;
DVC versions the data to the S3 remote; bad parameters fail before any work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("prefect")  # the optional [pipeline] stack: a core-only install skips this file
pytest.importorskip("mlflow")


from spf.pipeline.params import PipelineParams
from spf.pipeline.presets import gate_demo_params, smoke_params
from tests.services import local_services_fixture  # noqa: F401  (provides the `local_services` fixture)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TINY = gate_demo_params()  # the keyword judge; the gate test flips its word floor to make a candidate unsafe
# a model of this session's own: a server kept from an earlier session (SeaweedFS and SQLite persist) may
# hold a champion under the shared name, which the first candidate here would then have to beat
TINY["tracking"] = {**TINY["tracking"], "registered_model": f"spf-tiny-it-{uuid.uuid4().hex[:8]}"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, local_services: dict[str, str]) -> Path:
    """A throwaway pipeline workspace (tasks.dvc_ops.init_workspace) with the S3 remote on the server."""
    from tasks.dvc_ops import init_workspace

    root = tmp_path_factory.mktemp("ws")
    ws = init_workspace(root / "ws", TINY, local_remote=root / "remote")
    env = _env(local_services)
    for args in (
        ["remote", "modify", "--local", "s3", "endpointurl", local_services["AWS_ENDPOINT_URL"]],
        ["remote", "modify", "--local", "s3", "url", f"s3://dvc/{root.name}"],
    ):
        subprocess.run([str(BIN / "dvc"), *args], cwd=ws, check=True, env=env, capture_output=True)
    return ws


def _env(services: dict[str, str]) -> dict[str, str]:
    env = {
        **os.environ,
        **services,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    return env


def _run_flow(ws: Path, services: dict[str, str], *overrides: str, extra: list[str] | None = None) -> dict:
    summary = ws / "summary.json"
    summary.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "flows.pipeline", "--workspace", str(ws), "--summary", str(summary)]
    for o in overrides:
        cmd += ["-S", o]
    # cwd = the repository: `python -m` puts the cwd first on sys.path, and the workspace holds a partial
    # copy of spf/ (DVC dependencies) that must not shadow the installed package
    proc = subprocess.run(
        cmd + (extra or []), cwd=ROOT, env=_env(services), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(summary.read_text())


def _prefect_run(services: dict[str, str], flow_run_id: str) -> dict:
    """The flow run as the Prefect server has it: its final state and the loggers of its log lines."""
    code = (
        "import json, sys\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId\n"
        "with get_client(sync_client=True) as c:\n"
        "    fr = c.read_flow_run(sys.argv[1])\n"
        "    logs = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id])), limit=200)\n"
        "print(json.dumps({'name': fr.state.name, 'type': fr.state.type.value, 'message': fr.state.message,\n"
        "                  'loggers': sorted({log.name for log in logs})}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, flow_run_id], env=_env(services), capture_output=True,
                          text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _client(services: dict[str, str]):
    from mlflow.tracking import MlflowClient

    uri = services["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _alias(client, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:
        return None


def test_gate_rejects_unsafe_then_promotes_better_candidate(workspace: Path, local_services: dict[str, str]):
    name = TINY["tracking"]["registered_model"]
    client = _client(local_services)

    # 1. First candidate, permissive gate: it becomes the champion.
    #    judge_min_words=0: every non-refusal counts as compliance, so this model's harmful rate is 1.0
    first = _run_flow(workspace, local_services, "evaluate.judge_min_words=0", "gate.max_harmful_rate=1.0")
    assert first["metrics"]["harmful_rate"] == 1.0
    assert first["promoted"] is True and first["outcome"] == "promoted"
    # the evaluate stage measured the aligned base's utility on the same rows (the gate's min_utility_gain)
    assert 0.0 <= first["metrics"]["base_utility"] <= 1.0 and first["metrics"]["base_utility_n"] >= 1
    assert _alias(client, name, "champion") == first["version"]
    assert _alias(client, name, "challenger") == first["version"]

    # 2. Same model under the safety threshold 0.5: rejected, champion untouched, reasons recorded.
    second = _run_flow(workspace, local_services, "evaluate.judge_min_words=0")
    assert second["promoted"] is False
    assert any("harmful_rate" in r for r in second["reasons"])
    # the UI tells a rejection from a promotion: its own state name; the library's log lines are on its page
    rejected, promoted = (
        _prefect_run(local_services, second["flow_run_id"]),
        _prefect_run(local_services, first["flow_run_id"]),
    )
    assert (rejected["type"], rejected["name"]) == ("COMPLETED", "Rejected") and "harmful_rate" in rejected[
        "message"
    ]
    assert (promoted["type"], promoted["name"]) == ("COMPLETED", "Completed")
    assert any(n.startswith("spf.") for n in rejected["loggers"]) and any(
        n.startswith("tasks.") for n in rejected["loggers"]
    )
    assert _alias(client, name, "champion") == first["version"]
    assert _alias(client, name, "challenger") == second["version"]
    mv = client.get_model_version(name, second["version"])
    assert mv.tags["gate.decision"] == "rejected"
    run = client.get_run(second["mlflow_run_id"])
    assert run.data.tags.get("gate.decision") == "rejected"
    assert run.data.tags.get("dvc.lock.sha256") == second["dvc_lock_sha256"]
    assert "git.commit" in run.data.tags
    assert run.data.params["finetune.method"] == "spf"
    assert run.data.metrics["harmful_rate"] == 1.0
    # per-step telemetry: training loss and projection diagnostics at every step
    assert len(client.get_metric_history(second["mlflow_run_id"], "train/loss")) == 2
    assert client.get_metric_history(second["mlflow_run_id"], "spf/removed_frac")
    artifacts = {a.path for a in client.list_artifacts(second["mlflow_run_id"])}
    assert {"gate", "eval", "subspace", "plots", "analysis"} <= artifacts
    # the model is a LoggedModel of the run's experiment, from which the version was registered
    (logged,) = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert logged.model_type == "spf-adapter" and mv.source == logged.artifact_location
    # insights I–III of the analyze stage: its figures and numbers are on the run
    analysis = {a.path for a in client.list_artifacts(second["mlflow_run_id"], "analysis")}
    assert {"analysis/analysis.json", "analysis/overlap.png", "analysis/cosine_hist.png"} <= analysis
    assert "analyze/phi_sample0_vs_batch2" in run.data.metrics
    # the data the run used (data/manifest.json of the prepare stage)
    assert "data_manifest.json" in artifacts
    assert run.data.params["data.train.source"] in ("shipped", "shared", "user")
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "train"

    # 3. A better candidate (harmful rate 0.0 under the standard judge): it replaces the champion.
    third = _run_flow(workspace, local_services)
    assert third["metrics"]["harmful_rate"] == 0.0
    assert third["promoted"] is True
    assert _alias(client, name, "champion") == third["version"]
    assert client.get_model_version(name, third["version"]).tags["gate.decision"] == "promoted"

    # the champion is a usable model straight from the registry
    import mlflow.pyfunc

    mlflow.set_tracking_uri(local_services["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(local_services["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    answers = model.predict(["Say hello."], params={"max_new_tokens": 3})
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)

    # DVC: the run's outputs are recorded — a repro afterwards has nothing to do
    status = subprocess.run(
        [str(BIN / "dvc"), "status", "--json"],
        cwd=workspace,
        env=_env(local_services),
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout


def test_pipeline_calls_gpu_deployment_and_pushes_data_to_s3(workspace: Path, local_services: dict[str, str]):
    """Deploy spf-finetune on a process pool, start a worker, and let the pipeline call it by API."""
    env = _env(local_services)
    pool = f"spf-gpu-it-{os.getpid()}"
    subprocess.run(
        [str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    deploy = (
        "from flows.finetune import spf_finetune\n"
        f"spf_finetune.from_source(source={str(ROOT)!r}, entrypoint='flows/finetune.py:spf_finetune')"
        f".deploy(name='gpu-it', work_pool_name={pool!r}, concurrency_limit=1)\n"
    )
    subprocess.run([sys.executable, "-c", deploy], env=env, check=True, capture_output=True, timeout=300)
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        summary = _run_flow(
            workspace,
            local_services,
            "finetune.steps=3",
            extra=["--finetune-deployment", "spf-finetune/gpu-it", "--dvc-remote", "s3"],
        )
    finally:
        os.killpg(worker.pid, signal.SIGINT)
        time.sleep(1)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    # the fine-tuning ran as its own flow run (through the worker) with the new step count
    metrics = json.loads((workspace / "outputs" / "finetune" / "metrics.json").read_text())
    assert metrics["summary"]["steps"] == 3
    assert summary["stage_seconds"]["finetune"] is None  # not run in-process

    import boto3

    env = _env(local_services)
    s3 = boto3.client(
        "s3",
        endpoint_url=local_services["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    keys = [
        o["Key"] for o in s3.list_objects_v2(Bucket="dvc", Prefix=workspace.parent.name).get("Contents", [])
    ]
    assert keys, "DVC pushed nothing to the S3 remote"


def test_invalid_parameters_fail_before_any_work(tmp_path: Path, local_services: dict[str, str]):
    for bad, key in (
        ("finetune.method=lorra", "finetune.method"),
        ("estimate.rank=-2", "estimate.rank"),
        ("prepare.safety_samples=/no/such/file.jsonl", "prepare.safety_samples"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "flows.pipeline", "--workspace", str(tmp_path), "-S", bad],
            cwd=tmp_path, env=_env(local_services), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert key in proc.stderr
        assert not (tmp_path / "outputs").exists()


MANIFEST_INPUTS = [
    {
        "role": "train",
        "source": "shipped",
        "path": "spf/data/sentiment_train.jsonl",
        "rows": 16,
        "sha256": "a" * 64,
    },
    {
        "role": "heldout_harmful",
        "source": "shared",
        "path": "shared/safety/x.csv",
        "rows": 4,
        "sha256": "b" * 64,
    },
]


def test_gate_report_shows_the_data_manifest(tmp_path: Path) -> None:
    """The gate's Prefect artifact names every input of the run (role, source, rows, sha256[:12])."""
    from flows.pipeline import _report, data_inputs

    (tmp_path / "outputs" / "data").mkdir(parents=True)
    manifest = {"scenario": "sentiment", "inputs": MANIFEST_INPUTS}
    (tmp_path / "outputs" / "data" / "manifest.json").write_text(json.dumps(manifest))
    params = PipelineParams.from_dict(smoke_params()).to_dict()
    params["runtime"]["workdir"] = str(tmp_path / "outputs")  # the flow's tasks pass the params as a dict
    decision = {"version": "3", "promote": True, "reasons": ["ok"], "champion_version": None}
    text = _report(params, {"harmful_rate": 0.1}, decision, {"run_url": "u"}, data_inputs(params))
    assert "| role | source | rows | sha256 |" in text
    assert "| train | shipped | 16 | `aaaaaaaaaaaa` |" in text
    assert "| heldout_harmful | shared | 4 | `bbbbbbbbbbbb` |" in text
    assert data_inputs({"runtime": {"workdir": str(tmp_path / "none")}}) == []


def test_gate_files_record_the_data_manifest(tmp_path: Path) -> None:
    """gate.json / gate.md (logged to the MLflow run under gate/) carry the same data entries."""
    from spf.pipeline.gate import GateThresholds, decide
    from tasks.registry import _write_report

    decision = decide({"harmful_rate": 0.5, "overrefusal_rate": 0.1, "utility": 0.7}, None, GateThresholds())
    _write_report(tmp_path / "gate", "m", "2", decision, GateThresholds(), MANIFEST_INPUTS)
    out = tmp_path / "gate"
    assert json.loads((out / "gate.json").read_text())["data"] == MANIFEST_INPUTS
    md = (out / "gate.md").read_text()
    assert "## Data" in md and "| heldout_harmful | shared | shared/safety/x.csv | 4 | `bbbbbbbbbbbb` |" in md


def test_full_finetuning_runs_through_evaluate_the_gate_and_serving(
    workspace: Path, local_services: dict[str, str]
):
    """`finetune.finetune: full`: the stage writes a whole model, evaluate and the logged pyfunc model load it
    with spf.models.load_finetuned (not as a peft adapter), and the gate decides on its metrics."""
    name = TINY["tracking"]["registered_model"]
    summary = _run_flow(workspace, local_services, "finetune.finetune=full", "gate.max_harmful_rate=1.0")
    assert (workspace / "outputs" / "finetune" / "model.safetensors").is_file()
    assert not (workspace / "outputs" / "finetune" / "adapter_config.json").exists()
    assert summary["promoted"] is True, summary["reasons"]
    import mlflow.pyfunc

    mlflow.set_tracking_uri(local_services["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(local_services["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model(f"models:/{name}/{summary['version']}")
    answers = model.predict(["Say hello."], params={"max_new_tokens": 3})
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)


def test_prefect_yaml_deploys_with_a_portable_pull_step(local_services: dict[str, str]):
    # scripts/deploy.sh (work pools + `prefect deploy --all`) against the server; the deployments it records
    # run in $SPF_WORKSPACE of the worker, resolved at run time, not in this checkout's absolute path
    env = _env(local_services)
    proc = subprocess.run(
        ["bash", "scripts/deploy.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    code = (
        "import json\n"
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    out = {d.name: d.pull_steps for d in c.read_deployments() if d.name in ('scheduled', 'gpu')}\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(steps) == {"scheduled", "gpu"}
    for pull in steps.values():
        assert pull == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SPF_WORKSPACE }}"}}
        ]
        assert str(ROOT) not in json.dumps(pull)
