"""Security properties, each checked against the code or a real (tiny) run:

(a) weights are read from safetensors only; pickled weights need an explicit opt-in;
(b) `trust_remote_code` is never true, and adapters load through the one checked loader;
(c) credentials in the environment never reach params, tags, logs, outputs or the MLflow store, and
    credential-looking parameter values are rejected or redacted;
(d) configured output paths cannot leave the workspace;
(e) the local servers bind to 127.0.0.1.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spf.models import ModelLoadError, check_adapter_folder, load_model, tiny_llama
from spf.pipeline.params import ParamsError, PipelineParams
from spf.pipeline.stages import STAGES, run_stage
from tests.helpers import stage_workspace

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("spf", "tasks", "flows", "scripts")


# ------------------------------------------------------------------------------ (a) safetensors only


def _pickled_model(tmp: Path) -> Path:
    model, tok = tiny_llama()
    folder = tmp / "model"
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_are_refused_by_default_and_the_message_names_the_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _pickled_model(tmp_path)
    for off in (None, "0", "false", ""):
        if off is None:
            monkeypatch.delenv("SPF_ALLOW_PICKLE", raising=False)
        else:
            monkeypatch.setenv("SPF_ALLOW_PICKLE", off)
        with pytest.raises(ModelLoadError) as info:
            load_model(str(folder))
        msg = str(info.value)
        assert "pytorch_model.bin" in msg and "safetensors only" in msg
        assert "allow_pickle=True" in msg and "SPF_ALLOW_PICKLE=1" in msg
    # the explicit argument wins over the environment
    monkeypatch.setenv("SPF_ALLOW_PICKLE", "1")
    with pytest.raises(ModelLoadError):
        load_model(str(folder), allow_pickle=False)


def test_pickled_weights_load_with_the_explicit_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _pickled_model(tmp_path)
    ref, _ = tiny_llama()
    monkeypatch.delenv("SPF_ALLOW_PICKLE", raising=False)
    model, _ = load_model(str(folder), allow_pickle=True)
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    monkeypatch.setenv("SPF_ALLOW_PICKLE", "1")
    assert load_model(str(folder))[0] is not None


def test_pickled_adapter_is_refused_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig, get_peft_model

    monkeypatch.delenv("SPF_ALLOW_PICKLE", raising=False)
    folder = tmp_path / "adapter"
    get_peft_model(tiny_llama()[0], LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    assert check_adapter_folder(folder)["r"] == 2
    weights = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(weights, folder / "adapter_model.bin")
    with pytest.raises(ModelLoadError, match=r"adapter_model\.bin.*SPF_ALLOW_PICKLE=1"):
        load_model(str(folder))  # an adapter folder as a model reference
    with pytest.raises(ModelLoadError, match=r"adapter_model\.bin"):
        check_adapter_folder(folder)
    assert check_adapter_folder(folder, allow_pickle=True)["r"] == 2


# ----------------------------------------------------------------------------- (b) no remote code


def _python_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))


def _receiver(call: ast.Call) -> str:
    func = call.func
    assert isinstance(func, ast.Attribute)
    return ast.unparse(func.value)


# PeftModel.from_pretrained outside spf/models.py: none — the MLflow pyfunc wrapper (tasks/pyfunc_model.py)
# calls spf.models.load_adapter too, so any direct call fails this test.
PEFT_LOADERS_OUTSIDE_SPF: set[str] = set()


def test_trust_remote_code_is_never_true_and_adapters_go_through_the_one_loader() -> None:
    files = _python_files()
    assert len(files) > 20
    problems: list[str] = []
    from_pretrained = 0
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text(encoding="utf-8")
        if re.search(r"trust_remote_code\s*=\s*True", text):
            problems.append(f"{rel}: trust_remote_code=True")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if "trust_remote_code" in kw and not (
                isinstance(kw["trust_remote_code"], ast.Constant) and kw["trust_remote_code"].value is False
            ):
                problems.append(f"{rel}:{node.lineno}: trust_remote_code is not the literal False")
            if not (isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained"):
                continue
            from_pretrained += 1
            if _receiver(node).endswith("PeftModel"):
                if rel != "spf/models.py" and rel not in PEFT_LOADERS_OUTSIDE_SPF:
                    problems.append(
                        f"{rel}:{node.lineno}: PeftModel.from_pretrained outside spf.models.load_adapter"
                    )
            elif "trust_remote_code" not in kw:
                problems.append(
                    f"{rel}:{node.lineno}: {_receiver(node)}.from_pretrained without trust_remote_code=False"
                )
            if re.search(r"\b(torch\.load|pickle\.loads?|cloudpickle)\(", ast.unparse(node)):
                problems.append(f"{rel}:{node.lineno}: unpickling")
        for m in re.finditer(r"\b(torch\.load|pickle\.loads?)\(", text):
            problems.append(f"{rel}: {m.group(1)}(")
    assert from_pretrained >= 8  # the scan sees the loaders (models, judges, align, tasks)
    assert not problems, "\n".join(problems)


def test_the_scan_catches_violations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan above on a planted file: each kind of violation is reported."""
    bad = tmp_path / "spf" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "from transformers import AutoModel\nfrom peft import PeftModel\n"
        "a = AutoModel.from_pretrained('x')\n"
        "b = AutoModel.from_pretrained('x', trust_remote_code=True)\n"
        "c = PeftModel.from_pretrained(a, 'y')\n"
    )
    for d in SOURCE_DIRS[1:]:
        (tmp_path / d).mkdir()
    for i in range(21):
        (tmp_path / "tasks" / f"ok{i}.py").write_text(
            "from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained('x', trust_remote_code=False)\n"
        )
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    with pytest.raises(AssertionError) as info:
        test_trust_remote_code_is_never_true_and_adapters_go_through_the_one_loader()
    text = str(info.value)
    assert "spf/bad.py: trust_remote_code=True" in text
    assert "spf/bad.py:3: AutoModel.from_pretrained without trust_remote_code=False" in text
    assert "spf/bad.py:5: PeftModel.from_pretrained outside spf.models.load_adapter" in text


# ------------------------------------------------------------------------------- (c) credentials

MARKERS = {
    "AWS_SECRET_ACCESS_KEY": "awsSECRETmarker7f3a9",
    "AWS_ACCESS_KEY_ID": "AKIAMARKER5C2E",
    "MLFLOW_TRACKING_PASSWORD": "mlflowPASSWORDmarker19d",
    "MLFLOW_TRACKING_USERNAME": "mlflowUSERmarker44b",
    "MLFLOW_TRACKING_TOKEN": "mlflowTOKENmarker8e1",
    "HF_TOKEN": "hfTOKENmarker0a6",
}
PARAM_SECRET = "paramSECRETmarker3b7"


def _leaks(root: Path, texts: list[str]) -> list[str]:
    """Where any marker occurs: every file under ``root`` (bytes, any format) and the given texts."""
    markers = [*MARKERS.values(), PARAM_SECRET]
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {m}" for m in markers if m.encode() in data]
    for i, text in enumerate(texts):
        found += [f"captured output {i}: {m}" for m in markers if m in text]
    return found


def test_credentials_never_reach_outputs_logs_or_the_tracking_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    pytest.importorskip("mlflow")  # the optional [pipeline] stack
    from tasks import tracking

    for key, value in MARKERS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caplog.set_level(logging.DEBUG)
    ws, params = stage_workspace(tmp_path / "ws", stages=())
    with contextlib.chdir(ws):
        p = PipelineParams.from_dict(params)
        results = {stage: run_stage(stage, p) for stage in STAGES}

    # the tracking code path of the flow, on a local SQLite store (no server)
    client = tracking.make_client(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    tagged = {
        "spf.method": "spf",
        "aws_secret_access_key": PARAM_SECRET,
        "remote": f"s3://u:{PARAM_SECRET}@h/x",
    }
    run_id = tracking.start_run(
        client, "spf-security", "leak-check", tagged, repo_dir=ws, dvc_lock=ws / "dvc.lock"
    )
    logged = tracking.log_params(
        client,
        run_id,
        {**params, "s3": {"aws_secret_access_key": PARAM_SECRET, "endpoint": f"http://k:{PARAM_SECRET}@h"}},
    )
    assert logged["s3.aws_secret_access_key"] == tracking.REDACTED
    metrics = {f"{stage}/{k}": v for stage, r in results.items() for k, v in r.items()}
    tracking.log_metrics(client, run_id, metrics)
    tracking.log_telemetry(client, run_id, ws / "outputs" / "finetune" / "metrics.json")
    tracking.log_artifacts(client, run_id, ws / "outputs" / "eval", "eval")
    tracking.log_artifacts(client, run_id, ws / "outputs" / "finetune", "model")
    tracking.set_tags(client, run_id, {"hf_token": PARAM_SECRET, "gate.decision": "promoted"})
    tracking.end_run(client, run_id)
    run = client.get_run(run_id)
    assert run.data.params and run.data.metrics and run.data.tags["gate.decision"] == "promoted"

    captured = capsys.readouterr()
    texts = [captured.out, captured.err, caplog.text, json.dumps(results), json.dumps(run.to_dictionary())]
    assert (tmp_path / "mlflow" / "mlflow.db").is_file() and list((tmp_path / "mlflow").rglob("metrics.json"))
    assert not _leaks(tmp_path, texts)
    # (the scan does find a marker where there is one)
    (tmp_path / "ws" / "outputs" / "eval" / "planted.bin").write_bytes(b"\0" + MARKERS["HF_TOKEN"].encode())
    assert _leaks(tmp_path, []) == [f"ws/outputs/eval/planted.bin: {MARKERS['HF_TOKEN']}"]


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"tracking": {"password": PARAM_SECRET}}, "tracking.password: unknown key"),
        (
            {"tracking": {"experiment": {"aws_secret_access_key": PARAM_SECRET}}},
            "tracking.experiment: must be str",
        ),
        ({"tracking": {"tracking_uri": f"https://bob:{PARAM_SECRET}@mlflow.example"}}, "must not embed"),
        ({"tracking": {"tracking_uri": f"https://{PARAM_SECRET}@mlflow.example"}}, "must not embed"),
        ({"s3": {"secret_key": PARAM_SECRET}}, "s3: unknown key"),
    ],
)
def test_credentials_in_params_are_rejected_without_echoing_them(section: dict, key: str) -> None:
    with pytest.raises(ParamsError) as info:
        PipelineParams.from_dict(section, source="params.yaml")
    assert key in str(info.value)
    assert PARAM_SECRET not in str(info.value)


def test_a_plain_tracking_uri_is_accepted() -> None:
    assert PipelineParams.from_dict(
        {"tracking": {"tracking_uri": "http://127.0.0.1:5000"}}
    ).tracking.tracking_uri


# -------------------------------------------------------------------------------- (d) workspace


@pytest.mark.parametrize("workdir", ["../outside", "a/../../outside", "/tmp/spf-outside", "~/outside"])
def test_workdir_cannot_leave_the_workspace(workdir: str) -> None:
    with pytest.raises(ParamsError, match=r"runtime\.workdir: must be a relative path inside the workspace"):
        PipelineParams.from_dict({"runtime": {"workdir": workdir}})


def test_a_symlinked_workdir_leading_outside_is_refused_before_any_stage_writes(tmp_path: Path) -> None:
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (ws / "outputs").symlink_to(outside, target_is_directory=True)
    (ws / "inside").mkdir()
    (ws / "ok").symlink_to(ws / "inside", target_is_directory=True)
    p = PipelineParams.from_dict({"prepare": {"scenario": "sentiment"}})  # workdir "outputs"
    with contextlib.chdir(ws), pytest.raises(ParamsError, match="outside the workspace"):
        run_stage("prepare", p)
    assert list(outside.iterdir()) == []
    inside = PipelineParams.from_dict({"runtime": {"workdir": "ok"}})
    assert inside.check_workspace(ws) == (ws / "inside").resolve()  # a link within the workspace is fine
    shutil.rmtree(outside)


# --------------------------------------------------------------------------------- (e) servers


def _commands(script: str) -> list[str]:
    """Shell commands with backslash continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    return [line.split(" #", 1)[0] for line in joined.splitlines() if not line.lstrip().startswith("#")]


def test_servers_bind_to_localhost_only() -> None:
    script = (REPO / "scripts" / "services.sh").read_text()
    lines = _commands(script)
    host = [line.strip() for line in lines if re.match(r"\s*HOST=", line)]
    assert host, "services.sh sets no HOST"
    for line in host:
        assert re.fullmatch(r'HOST=(127\.0\.0\.1|"?\$\{\w+:-127\.0\.0\.1\}"?)', line), line
    servers = {  # how each server is started → the flag that must bind it to $HOST
        r'moto_server"?\s+-': r'-H "\$HOST"',
        r'mlflow"?\s+server\b': r'--host "\$HOST"',
        r'prefect"?\s+server\s+start': r'--host "\$HOST"',
    }
    for marker, flag in servers.items():
        starts = [line for line in lines if re.search(marker, line)]
        assert starts, f"no {marker} start in services.sh"
        for line in starts:
            assert re.search(flag, line), f"{marker} not bound to $HOST: {line.strip()}"
    for path in (REPO / "scripts").iterdir():
        if path.is_file():
            for line in _commands(path.read_text(errors="replace")):
                assert "0.0.0.0" not in line, f"{path.name}: {line.strip()}"
