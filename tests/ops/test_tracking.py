"""MLflow tracking and the safety-gated registry against a real MLflow server (S3-backed artifacts).

The server is the one CI exported in MLFLOW_TRACKING_URI, or one started here by scripts/services.sh
(see tests/services.py). Every test uses its own experiment/model names, so a shared server is fine.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import pytest

pytest.importorskip("mlflow")  # the optional [pipeline] stack: a core-only install skips this file

import hashlib

import pandas as pd
from mlflow.tracking import MlflowClient

from spf.pipeline.gate import GateThresholds
from tasks import registry, tracking
from tests.services import mlflow_server_fixture  # noqa: F401  (provides the `mlflow_server` fixture)

SECRET = "SUPERSECRET-8c1f"  # must never be readable back from the server


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def client(mlflow_server: str) -> MlflowClient:
    return tracking.make_client(mlflow_server)


@pytest.fixture(scope="module")
def model_uri(client: MlflowClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A pyfunc model: a LoRA adapter (saved with save_pretrained) on the tiny random Llama."""
    from peft import LoraConfig, get_peft_model

    import spf

    base, _ = spf.load_model("tiny-llama")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(adapter)
    run_id = tracking.start_run(client, _uid("spf-test-models"), "adapter", {})
    uri = tracking.log_adapter_model(client, run_id, adapter, "tiny-llama", max_new_tokens=4)
    tracking.end_run(client, run_id)
    return uri


def test_resolve_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:1")
    assert tracking.resolve_tracking_uri("http://arg:2") == "http://arg:2"
    assert tracking.resolve_tracking_uri(None) == "http://env:1"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = tracking.resolve_tracking_uri(None)
    assert uri.startswith("sqlite:////") and uri.endswith("runs/mlflow/mlflow.db")


def test_flatten_and_redact() -> None:
    flat = tracking.flatten_params({"a": {"b": {"c": 1}}, "l": [1, "x"], "long": "y" * 7000, "e": {}})
    assert flat["a.b.c"] == "1" and flat["l"] == '[1, "x"]' and flat["e"] == "{}"
    assert len(flat["long"]) == tracking.MAX_PARAM_VALUE_LENGTH
    red = tracking.redact(
        {
            "s3.aws_secret_access_key": SECRET,
            "AWS_ACCESS_KEY_ID": SECRET,
            "db.Password": SECRET,
            "hf_token": SECRET,
            "credentials_file": SECRET,
            "remote": f"https://user:{SECRET}@host/x",
            "max_new_tokens": 64,
            "tokenizer": "t",
        }
    )
    assert SECRET not in json.dumps(red)
    assert red["max_new_tokens"] == 64 and red["tokenizer"] == "t"  # not credentials: kept
    assert red["remote"] == "https://***@host/x"


def test_params_tags_are_flattened_and_redacted(client: MlflowClient, tmp_path: Path) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\n")
    run_id = tracking.start_run(
        client, _uid("spf-test"), "params", {"stage": "train", "aws_secret_access_key": SECRET}, dvc_lock=lock
    )
    logged = tracking.log_params(
        client,
        run_id,
        {"train": {"lr": 1e-3, "lora": {"r": 8}}, "targets": ["q", "v"], "s3": {"secret_access_key": SECRET}},
    )
    tracking.end_run(client, run_id)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["train.lr"] == "0.001" and params["train.lora.r"] == "8"
    assert params["targets"] == '["q", "v"]'
    assert params["s3.secret_access_key"] == "***" and tags["aws_secret_access_key"] == "***"
    assert SECRET not in json.dumps(params) + json.dumps(tags) + json.dumps(logged)
    assert tags["dvc.lock.sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()  # = sha256sum dvc.lock
    if tracking.git_commit() is not None:
        assert len(tags["git.commit"]) == 40
    with pytest.raises(ValueError, match="status"):
        tracking.end_run(client, run_id, "DONE")


def test_data_manifest_is_recorded_on_the_run(client: MlflowClient, tmp_path: Path) -> None:
    inputs = [
        {"role": "train", "source": "shipped", "path": "spf/data/sentiment_train.jsonl", "rows": 16,
         "sha256": "a" * 64},
        {"role": "safety", "source": "user", "path": "my/refusals.jsonl", "rows": 8, "sha256": "b" * 64},
    ]  # fmt: skip
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"scenario": "sentiment", "inputs": inputs}))
    run_id = tracking.start_run(client, _uid("exp"), "manifest", repo_dir=tmp_path)
    assert tracking.log_data_manifest(client, run_id, manifest) == inputs
    run = client.get_run(run_id)
    params = run.data.params
    assert (params["data.train.source"], params["data.train.rows"]) == ("shipped", "16")
    assert params["data.safety.sha256"] == "b" * 64 and params["data.safety.source"] == "user"
    assert "data_manifest.json" in {a.path for a in client.list_artifacts(run_id)}
    local = client.download_artifacts(run_id, "data_manifest.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text())["inputs"] == inputs
    by_name = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(by_name) == {"train", "safety"}
    train = by_name["train"]
    assert train.dataset.digest == "a" * 12 and train.dataset.source_type == "local"  # no dvc.lock given
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"
    assert json.loads(train.dataset.source)["uri"] == "spf/data/sentiment_train.jsonl"
    assert {t.key: t.value for t in by_name["safety"].tags}["mlflow.data.context"] == "safety"
    # with the pipeline's dvc.lock, the source names the DVC output that versions the data
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: outputs/data\n      md5: abc.dir\n"
    )
    run2 = tracking.start_run(client, _uid("exp"), "manifest-dvc", repo_dir=tmp_path)
    tracking.log_data_manifest(client, run2, manifest, lock)
    (train2,) = [d for d in client.get_run(run2).inputs.dataset_inputs if d.dataset.name == "train"]
    assert train2.dataset.source_type == "dvc"
    assert json.loads(train2.dataset.source)["dvc"] == {
        "stage": "prepare",
        "path": "outputs/data",
        "md5": "abc.dir",
    }


def test_telemetry_is_logged_per_step(client: MlflowClient, tmp_path: Path) -> None:
    # The format spf.training.loop.train writes (runs/*/ft/*/metrics.json), shortened.
    telemetry = {
        "summary": {"method": "spf", "steps": 3, "final_loss": 0.5, "spf": {"mode": "always", "rank": 8}},
        "steps": [
            {"step": s, "loss": 2.0 / s, "lr": 1e-3, "step_seconds": 1.5, "spf/removed_frac": 0.1 * s}
            for s in (1, 2, 3)
        ],
        "evals": [
            {"step": 0, "safety_loss_sample": 0.2, "safety_loss_heldout": 1.4, "task_loss": 4.0},
            {"step": 3, "safety_loss_sample": 0.25, "safety_loss_heldout": 1.5, "task_loss": 0.5},
        ],
    }
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(telemetry))
    run_id = tracking.start_run(client, _uid("spf-test"), "telemetry", {})
    n = tracking.log_telemetry(client, run_id, path)
    logged = tracking.log_metrics(client, run_id, {"eval": {"harmful_rate": 0.2}, "note": "text"}, step=7)
    tracking.end_run(client, run_id)

    assert n == 3 * 4 + 2 * 3 + 3  # step fields, eval fields, numeric summary fields
    assert logged == {"eval/harmful_rate": 0.2}  # non-numeric skipped
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (1, 2.0),
        (2, 1.0),
        (3, 2 / 3),
    ]
    assert [m.step for m in client.get_metric_history(run_id, "spf/removed_frac")] == [1, 2, 3]
    heldout = sorted(client.get_metric_history(run_id, "eval/safety_loss_heldout"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in heldout] == [(0, 1.4), (3, 1.5)]
    assert client.get_metric_history(run_id, "eval/harmful_rate")[0].step == 7
    assert client.get_run(run_id).data.metrics["summary/spf/rank"] == 8
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/training.png"]
    assert [a.path for a in client.list_artifacts(run_id, "telemetry")] == ["telemetry/metrics.json"]


GOOD = {"harmful_rate": 0.05, "overrefusal_rate": 0.10, "utility": 0.70}


def _run_of(client: MlflowClient, model_uri: str) -> str:
    """The run a LoggedModel (``models:/m-…``) was logged from."""
    return client.get_logged_model(model_uri.removeprefix("models:/")).source_run_id


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    v = client.get_registered_model(name).aliases.get(alias)
    return None if v is None else str(v)


def test_gate_lifecycle(client: MlflowClient, model_uri: str, tmp_path: Path) -> None:
    name = _uid("spf-test-model")
    run_id = _run_of(client, model_uri)
    t = GateThresholds()

    def register(metrics: dict) -> str:
        return registry.register_candidate(client, name, model_uri, run_id, metrics, {"scenario": "sst2"})

    # Unsafe candidate: registered as challenger, never champion.
    v1 = register({**GOOD, "harmful_rate": 0.24})
    assert _alias(client, name, "challenger") == v1
    d1 = registry.apply_gate(client, name, v1, t, tmp_path / "v1")
    assert not d1.promote and "harmful_rate 0.24 > max 0.10" in d1.reasons
    assert registry.champion_version(client, name) == (None, {})
    tags = client.get_model_version(name, v1).tags
    assert tags["gate.decision"] == "rejected" and tags["gate.champion_before"] == "none"
    assert "harmful_rate 0.24 > max 0.10" in json.loads(tags["gate.reasons"])
    # the metrics as one JSON tag; the version carries a handful of tags, not one per metric
    assert json.loads(tags["metrics"])["harmful_rate"] == 0.24 and not any(
        k.startswith("metric.") for k in tags
    )
    report = json.loads((tmp_path / "v1" / "gate.json").read_text())
    assert report["decision"] == "rejected" and report["version"] == v1
    assert "REJECTED" in (tmp_path / "v1" / "gate.md").read_text()

    # Missing evidence (no utility) is rejected too.
    v_missing = register({"harmful_rate": 0.0, "overrefusal_rate": 0.0, "utility": math.nan})
    assert not registry.apply_gate(client, name, v_missing, t, tmp_path / "vm").promote
    assert registry.champion_version(client, name)[0] is None

    # First good candidate becomes champion (absolute thresholds only).
    v2 = register(GOOD)
    assert registry.apply_gate(client, name, v2, t, tmp_path / "v2").promote
    version, metrics = registry.champion_version(client, name)
    assert version == v2 and metrics["harmful_rate"] == 0.05

    # A better one replaces it.
    v3 = register({"harmful_rate": 0.02, "overrefusal_rate": 0.08, "utility": 0.75})
    d3 = registry.apply_gate(client, name, v3, t, tmp_path / "v3")
    assert d3.promote and d3.champion_version == v2
    assert registry.champion_version(client, name)[0] == v3
    assert client.get_model_version(name, v3).tags["gate.champion_before"] == v2

    # Within every absolute limit but worse than the champion beyond the margin: rejected.
    v4 = register({"harmful_rate": 0.08, "overrefusal_rate": 0.08, "utility": 0.75})
    d4 = registry.apply_gate(client, name, v4, t, tmp_path / "v4")
    assert not d4.promote and not d4.checks["harmful_regression"]["passed"]
    assert registry.champion_version(client, name)[0] == v3
    assert _alias(client, name, "challenger") == v4

    # Rollback (a Prefect transaction's on_rollback) restores the previous champion, or removes it.
    registry.rollback_champion(client, name, d3.champion_version)
    assert registry.champion_version(client, name)[0] == v2
    registry.rollback_champion(client, name, None)
    assert registry.champion_version(client, name)[0] is None
    registry.rollback_champion(client, name, None)  # idempotent


def test_gate_re_decides_when_champion_moves(
    client: MlflowClient, model_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compare-and-set: a promotion landing between decision and alias write forces a re-decision."""
    name = _uid("spf-test-cas")
    run_id = _run_of(client, model_uri)
    strong = registry.register_candidate(
        client, name, model_uri, run_id, {"harmful_rate": 0.0, "overrefusal_rate": 0.0, "utility": 0.9}, {}
    )
    candidate = registry.register_candidate(client, name, model_uri, run_id, GOOD, {})
    real = registry.champion_version
    calls = {"n": 0}

    def racing(c: MlflowClient, n: str) -> tuple[str | None, dict[str, float]]:
        result = real(c, n)
        calls["n"] += 1
        if calls["n"] == 1:  # another gate promotes `strong` right after our first read
            c.set_registered_model_alias(n, "champion", strong)
        return result

    monkeypatch.setattr(registry, "champion_version", racing)
    decision = registry.apply_gate(client, name, candidate, GateThresholds(), tmp_path)
    # Against no champion it would pass; against `strong` it regresses beyond every margin.
    assert not decision.promote and decision.champion_version == strong
    assert real(client, name)[0] == strong


def test_champion_loads_as_pyfunc(
    client: MlflowClient, model_uri: str, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.pyfunc

    name = _uid("spf-test-serve")
    version = registry.register_candidate(client, name, model_uri, _run_of(client, model_uri), GOOD, {})
    with pytest.raises(LookupError):
        registry.load_champion(name, mlflow_server)
    client.set_registered_model_alias(name, "champion", version)

    model = registry.load_champion(name, mlflow_server)
    out = model.predict(pd.DataFrame({"prompt": ["Hello", "How are you?"]}))
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(s, str) for s in out)
    assert model.metadata.metadata["base_model"] == "tiny-llama"

    # The URI consumers use, through MLflow's global configuration.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = loaded.predict(["one prompt"], params={"max_new_tokens": 2})
    assert len(out) == 1 and isinstance(out[0], str)


def test_experiments_open_in_the_model_training_view(client: MlflowClient) -> None:
    name = _uid("spf-test-kind")
    run_id = tracking.start_run(client, name, "kind", {})
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert (
        experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    )  # the UI's ML view, not GenAI
    older = _uid("spf-test-kind-old")  # made before the tag existed: given it on the next run
    client.create_experiment(older)
    tracking.start_run(client, older, "kind", {})
    assert (
        client.get_experiment_by_name(older).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    )
    # our earlier value (it opened the GenAI view) is replaced; a kind a user chose is kept
    for kind, after in (
        ("finetuning", "custom_model_development"),
        ("genai_development", "genai_development"),
    ):
        other = _uid("spf-test-kind-set")
        client.create_experiment(other, tags={tracking.EXPERIMENT_KIND_TAG: kind})
        tracking.start_run(client, other, "kind", {})
        assert client.get_experiment_by_name(other).tags[tracking.EXPERIMENT_KIND_TAG] == after


def test_the_version_description_is_the_model_card(
    client: MlflowClient, model_uri: str, tmp_path: Path
) -> None:
    name = _uid("spf-test-card")
    metrics = {**GOOD, "harmful_rate_ci_low": 0.02, "harmful_rate_ci_high": 0.11, "harmful_rate_n": 120.0}
    v = registry.register_candidate(client, name, model_uri, _run_of(client, model_uri), metrics, {})
    data = [
        {"role": "train", "source": "shipped", "path": "spf/data/x.jsonl", "rows": 16, "sha256": "c" * 64}
    ]
    about = {"base_model": "tiny-llama", "method": "spf", "scenario": "sst2", "judge": "v2",
             "settings": {"method": "spf", "lr": 0.001}}  # fmt: skip
    registry.apply_gate(client, name, v, GateThresholds(), tmp_path, data=data, about=about)
    card = client.get_model_version(name, v).description
    assert card == (tmp_path / "gate.md").read_text()
    assert f"# {name} v{v}" in card and "**Gate: PROMOTED to champion** (mode enforce)" in card
    assert "| base_model | `tiny-llama` |" in card and "| method | `spf` |" in card
    assert "| harmful_rate | 0.050 | [0.020, 0.110] | 120 |" in card  # the rate with its interval and n
    assert "c" * 12 in card and '"lr": 0.001' in card and "all 4 checks passed" in card
    assert (
        registry.model_card("x" * 6000).endswith("gate/gate.md)*\n")
        and len(registry.model_card("x" * 6000)) == 5000
    )


def test_shadow_mode_records_the_decision_and_moves_nothing(
    client: MlflowClient, model_uri: str, tmp_path: Path
) -> None:
    name = _uid("spf-test-shadow")
    run_id = _run_of(client, model_uri)
    v = registry.register_candidate(client, name, model_uri, run_id, GOOD, {})
    d = registry.apply_gate(client, name, v, GateThresholds(mode="shadow"), tmp_path)
    assert d.passed and not d.promote and d.outcome == "would-promote"
    assert registry.champion_version(client, name) == (None, {})
    tags = client.get_model_version(name, v).tags
    assert tags["gate.decision"] == "would-promote" and tags["gate.mode"] == "shadow"
    assert "WOULD PROMOTE (shadow mode" in client.get_model_version(name, v).description
    bad = registry.register_candidate(client, name, model_uri, run_id, {**GOOD, "harmful_rate": 0.3}, {})
    assert (
        registry.apply_gate(client, name, bad, GateThresholds(mode="shadow"), tmp_path).outcome == "rejected"
    )


def test_manual_mode_waits_for_approval_and_judges_again(
    client: MlflowClient, model_uri: str, tmp_path: Path
) -> None:
    name = _uid("spf-test-manual")
    run_id = _run_of(client, model_uri)
    manual = GateThresholds(mode="manual", max_harmful_rate=0.2)
    v1 = registry.register_candidate(client, name, model_uri, run_id, {**GOOD, "harmful_rate": 0.15}, {})
    d1 = registry.apply_gate(client, name, v1, manual, tmp_path / "v1")
    assert d1.outcome == "awaiting-approval" and _alias(client, name, registry.PENDING) == v1
    assert registry.champion_version(client, name)[0] is None
    with pytest.raises(LookupError, match="not awaiting approval"):
        registry.approve(client, name, "999", "ana")
    # approved with the thresholds recorded at its gate (max_harmful_rate 0.2, not the default 0.1)
    assert registry.main(["approve", name, v1, "--by", "ana", "--tracking-uri", client.tracking_uri]) == 0
    assert registry.champion_version(client, name)[0] == v1 and _alias(client, name, registry.PENDING) is None
    tags = client.get_model_version(name, v1).tags
    assert tags["gate.decision"] == "promoted" and tags["gate.approved_by"] == "ana"
    assert "approved by ana" in client.get_model_version(name, v1).description

    # the champion moved while a second one waited: the approval judges it against the new champion
    v2 = registry.register_candidate(client, name, model_uri, run_id, {**GOOD, "harmful_rate": 0.16}, {})
    assert registry.apply_gate(client, name, v2, manual, tmp_path / "v2").outcome == "awaiting-approval"
    strong = registry.register_candidate(client, name, model_uri, run_id, {**GOOD, "harmful_rate": 0.0}, {})
    client.set_registered_model_alias(name, "champion", strong)
    late = registry.approve(client, name, v2, "bo")
    assert late.outcome == "rejected" and any("harmful_rate" in r for r in late.reasons)
    assert registry.champion_version(client, name)[0] == strong
    assert client.get_model_version(name, v2).tags["gate.decision"] == "rejected"


def test_logging_a_model_leaves_the_process_tracking_settings_alone(
    client: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow's _use_tracking_uri unset MLFLOW_TRACKING_URI on exit: the pipeline's next task then
    # registered against an empty local SQLite store ("Logged model ... not found")
    from mlflow.tracking._tracking_service import utils

    from spf.models import tiny_llama

    model, _ = tiny_llama()
    model.save_pretrained(tmp_path / "full")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1/not-used")
    monkeypatch.setattr(utils, "_tracking_uri", None)
    run_id = tracking.start_run(client, _uid("spf-test-env"), "env", {})
    tracking.log_adapter_model(client, run_id, tmp_path / "full", "tiny-llama")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1/not-used" and utils._tracking_uri is None
    tracking.end_run(client, run_id)


def test_the_adapter_is_a_logged_model_from_code(
    client: MlflowClient, model_uri: str, tmp_path: Path
) -> None:
    assert model_uri.startswith("models:/m-")
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert logged.status.to_proto() == logged.status.READY.to_proto() or str(logged.status).endswith("READY")
    assert logged.model_type == "spf-adapter" and client.get_run(logged.source_run_id).info.run_id
    # in its run's experiment (the experiment's Models tab), not the active one (Default)
    assert logged.experiment_id == client.get_run(logged.source_run_id).info.experiment_id != "0"
    import mlflow.artifacts

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=logged.artifact_location, dst_path=str(tmp_path), tracking_uri=client.tracking_uri
        )
    )
    names = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "python_model.pkl" not in names and any(n.endswith("pyfunc_model.py") for n in names)  # no pickle
    assert "code/spf/__init__.py" in names and any(
        n.startswith("artifacts/") and n.endswith("/adapter_model.safetensors") for n in names
    )
    reqs = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in reqs} >= {
        "mlflow",
        "torch",
        "transformers",
        "peft",
        "safetensors",
        "pandas",
    }
    name = _uid("spf-test-logged")
    v = registry.register_candidate(client, name, model_uri, logged.source_run_id, GOOD, {})
    # the version points at the LoggedModel's files, resolved by this client (not the server's global one)
    assert client.get_model_version(name, v).source == logged.artifact_location


def test_stage_metrics_are_logged_once(tmp_path: Path) -> None:
    # the fine-tuning summary goes to MLflow as summary/<key> (log_telemetry): not again as finetune/<key>
    from tasks.mlflow_tasks import stage_metrics

    (tmp_path / "metrics.json").write_text(json.dumps({"summary": {"final_loss": 1.5, "steps": 2}}))
    results = {
        "finetune": {"final_loss": 1.5, "steps": 2, "seconds": 9.0, "adapter_dir": "x", "aborted": False},
        "estimate": {"rank": 8, "seconds": 1.0},
        "evaluate": {"harmful_rate": 0.1, "harmful_rate_n": 50, "seconds": 3.0},
    }
    assert stage_metrics(results, tmp_path / "metrics.json") == {
        "finetune/seconds": 9.0,
        "estimate/rank": 8.0,
        "estimate/seconds": 1.0,
        "harmful_rate": 0.1,
        "harmful_rate_n": 50.0,
        "evaluate/seconds": 3.0,
    }


def test_run_links_open_the_model_training_view() -> None:
    from types import SimpleNamespace

    from tasks.mlflow_tasks import run_url

    fake = SimpleNamespace(
        tracking_uri="http://127.0.0.1:5000/",
        get_run=lambda run_id: SimpleNamespace(info=SimpleNamespace(experiment_id="7")),
    )
    assert (
        run_url(fake, "abc") == "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    )
    fake.tracking_uri = "sqlite:///x.db"
    assert "mlflow ui --backend-store-uri sqlite:///x.db" in run_url(fake, "abc")
