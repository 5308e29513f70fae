"""The DVC pipeline end to end (dvc.yaml + params.yaml + .dvc/config) on a tiny random model.

One throwaway DVC workspace per module (a git repo in tmp_path holding copies of the repository's dvc.yaml,
.dvc/config, .dvcignore and the files dvc.yaml lists as deps, plus a tiny params.yaml). The tests share it
and run in file order: repro → no-op repro → metrics → exp run → param change → push/pull (local, S3).
Each `spf` stage is a subprocess that pays the torch/transformers imports, hence the `slow` marker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from spf.pipeline.presets import smoke_params
from spf.pipeline.stages import STAGE_TABLE, STAGES
from tests.services import free_port

slow = pytest.mark.slow  # every test but the dvc.yaml check runs DVC on a workspace

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TINY_PARAMS = smoke_params()
# moto accepts any keys; a server CI started (SPF_S3_ENDPOINT) may want the ones in the environment
S3_ENV = {
    key: os.environ.get(key, default) if os.environ.get("SPF_S3_ENDPOINT") else default
    for key, default in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    )
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_", "GIT_"))}
    env.pop("SPF_SHARED_DATA", None)  # the sentiment scenario needs no public data
    env.update(S3_ENV)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the stage commands call `spf`
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return env


def run(cwd: Path, *cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(cwd, str(VENV_BIN / "dvc"), *args, check=check)


def git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    ident = [
        "-c",
        "user.name=spf-test",
        "-c",
        "user.email=spf-test@example.invalid",
        "-c",
        "commit.gpgsign=false",
    ]
    return run(cwd, "git", *ident, *args)


def ran(proc: subprocess.CompletedProcess[str]) -> set[str]:
    """Stages DVC reports as executed."""
    return set(re.findall(r"Running stage '([\w-]+)'", proc.stdout + proc.stderr))


def skipped(proc: subprocess.CompletedProcess[str]) -> set[str]:
    return set(re.findall(r"Stage '([\w-]+)' didn't change, skipping", proc.stdout + proc.stderr))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def set_params(ws: Path, **changes: object) -> None:
    """Edit params.yaml like a user would: ``set_params(ws, **{"estimate.rank": 3})``."""
    data = yaml.safe_load((ws / "params.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split(".")
        data[section][name] = value
    (ws / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


# ------------------------------------------------------------------------------- dvc.yaml = the table


def test_dvc_yaml_is_the_stage_table() -> None:
    """dvc.yaml declares what spf/pipeline/stages.py STAGE_TABLE says: command, params, the folders of
    earlier stages as deps, the output folder; every other dep is code or data that exists."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(spec) == list(STAGES)
    for name, row in STAGE_TABLE.items():
        stage = spec[name]
        assert stage["cmd"] == f"spf {name} --params params.yaml", name
        assert stage["params"] == list(row.params), name
        outputs = [d for d in stage["deps"] if d.startswith("outputs/")]
        assert outputs == [f"outputs/{folder}" for folder in row.inputs], name
        assert stage["outs"] == [f"outputs/{row.output}"], name
        code = [d for d in stage["deps"] if not d.startswith("outputs/")]
        assert "spf/pipeline/stages.py" in code, name  # the stage function itself
        for dep in code:
            assert (REPO / dep).exists(), f"{name}: dep {dep} does not exist"
    # a code folder dep must not change when Python byte-compiles it
    assert "__pycache__/" in (REPO / ".dvcignore").read_text()


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("dvc")  # the optional [pipeline] stack (the table check above needs none of it)
    from tasks.dvc_ops import init_workspace

    root = tmp_path_factory.mktemp("dvc")
    ws = init_workspace(root / "ws", TINY_PARAMS, local_remote=root / "remote")
    deps = [p.relative_to(ws).as_posix() for p in (ws / "spf").rglob("*") if p.is_file()]
    assert any(d.endswith(".py") for d in deps) and any(d.endswith(".jsonl") for d in deps)
    remotes = dvc(ws, "remote", "list").stdout
    assert "local" in remotes and "s3" in remotes
    assert dvc(ws, "config", "core.remote").stdout.strip() == "local"  # the default remote is the folder
    return ws


@pytest.fixture(scope="module")
def reproduced(workspace: Path) -> subprocess.CompletedProcess[str]:
    """The first `dvc repro` (every stage runs)."""
    return dvc(workspace, "repro")


# --------------------------------------------------------------------------------------------- tests


@slow
def test_repro_runs_every_stage(workspace: Path, reproduced: subprocess.CompletedProcess[str]) -> None:
    assert ran(reproduced) == set(STAGES), reproduced.stdout
    out = workspace / "outputs"
    for rel in (
        "data/train.jsonl",
        "data/safety.jsonl",
        "data/heldout_harmful.csv",
        "aligned/model_ref.json",
        "subspace/subspace.safetensors",
        "finetune/adapter_model.safetensors",
        "finetune/metrics.json",
        "eval/results.json",
        "telemetry.json",
    ):
        assert (out / rel).is_file(), rel
    assert len((out / "data" / "train.jsonl").read_text().splitlines()) == TINY_PARAMS["prepare"]["n"]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    # no machine-specific paths in an output: its hash is the cache key on every machine
    for key in ("heldout_source", "safety_source"):
        assert manifest[key].startswith(("spf/data/", "shared/")), manifest
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["harmful_rate"] <= 1.0 and "overrefusal_rate" in metrics
    telemetry = json.loads((out / "telemetry.json").read_text())  # step 0 = the safety loss before training
    assert [r["step"] for r in telemetry if "loss" in r] == [1, 2]
    assert all("safety_loss_heldout" in r for r in telemetry)  # eval_every: 1
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert lock["stages"]["finetune"]["params"]["params.yaml"]["finetune"]["steps"] == 2
    # no half-built folders left beside the outputs
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".gitignore"]


@slow
def test_second_repro_does_nothing(workspace: Path, reproduced: subprocess.CompletedProcess[str]) -> None:
    lock = (workspace / "dvc.lock").read_bytes()
    data = snapshot(workspace / "outputs" / "data")
    again = dvc(workspace, "repro")
    assert ran(again) == set(), again.stdout
    assert skipped(again) == set(STAGES), again.stdout
    assert (workspace / "dvc.lock").read_bytes() == lock
    assert snapshot(workspace / "outputs" / "data") == data
    status = dvc(workspace, "status", "--json")
    assert json.loads(status.stdout or "{}") == {}


@slow
def test_metrics_show(workspace: Path, reproduced: subprocess.CompletedProcess[str]) -> None:
    shown = json.loads(dvc(workspace, "metrics", "show", "--json").stdout)
    # {<workspace: "" in DVC 3.67, "workspace" before>: {"data": {"outputs/metrics.json": {"data": {...}}}}}
    (workspace_entry,) = shown.values()
    data = workspace_entry["data"]["outputs/metrics.json"]["data"]
    assert "harmful_rate" in data and data == json.loads((workspace / "outputs/metrics.json").read_text())


@slow
def test_exp_run_set_param(workspace: Path, reproduced: subprocess.CompletedProcess[str]) -> None:
    git(workspace, "add", "-A")  # dvc.lock, params.yaml, the .gitignore files DVC wrote
    git(workspace, "commit", "-q", "-m", "baseline")
    train = workspace / "outputs" / "data" / "train.jsonl"
    mtime, data = train.stat().st_mtime_ns, train.read_bytes()
    exp = dvc(workspace, "exp", "run", "-S", "finetune.steps=3")
    assert ran(exp) == {"finetune", "evaluate"}, exp.stdout
    assert {"prepare", "align", "estimate"} <= skipped(exp), exp.stdout
    assert train.stat().st_mtime_ns == mtime and train.read_bytes() == data
    metrics = json.loads((workspace / "outputs" / "finetune" / "metrics.json").read_text())
    assert metrics["summary"]["steps"] == 3 and len(metrics["steps"]) == 3
    assert yaml.safe_load((workspace / "params.yaml").read_text())["finetune"]["steps"] == 3
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert lock["stages"]["finetune"]["params"]["params.yaml"]["finetune"]["steps"] == 3
    assert dvc(workspace, "exp", "list", "--name-only").stdout.split()  # the experiment was recorded
    # a second run of the same experiment is a no-op
    assert ran(dvc(workspace, "repro")) == set()


@slow
def test_param_change_reruns_downstream_only(
    workspace: Path, reproduced: subprocess.CompletedProcess[str]
) -> None:
    assert json.loads(dvc(workspace, "status", "--json").stdout or "{}") == {}
    data = snapshot(workspace / "outputs" / "data")
    set_params(workspace, **{"estimate.rank": 3})
    status = json.loads(dvc(workspace, "status", "--json").stdout)
    # `dvc status` (and `dvc repro --dry`) report the stages whose *own* deps changed: estimate, and
    # finetune, which declares the estimate section (it projects with estimate.rank); analyze and evaluate
    # change through estimate's new output, which only a real `dvc repro` sees
    assert set(status) == {"estimate", "finetune"}, status
    for stage in ("estimate", "finetune"):
        assert {"changed deps": {"params.yaml": {"estimate": "modified"}}} in status[stage]
    repro = dvc(workspace, "repro")
    assert ran(repro) == {"estimate", "analyze", "finetune", "evaluate"}, repro.stdout
    assert skipped(repro) == {"prepare", "align"}
    assert snapshot(workspace / "outputs" / "data") == data
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert lock["stages"]["estimate"]["params"]["params.yaml"]["estimate"]["rank"] == 3


@slow
def test_push_pull_local_remote(workspace: Path, reproduced: subprocess.CompletedProcess[str]) -> None:
    remote = workspace.parent / "remote"  # where the fixture pointed `local`
    assert str(remote) in dvc(workspace, "remote", "list").stdout
    dvc(workspace, "push")  # the default remote (`local`)
    data = snapshot(workspace / "outputs" / "data")
    stored = {p.parent.name + p.name for p in remote.rglob("*") if p.is_file()}
    assert {md5(b) for b in data.values()} <= stored
    shutil.rmtree(workspace / "outputs" / "data")
    shutil.rmtree(workspace / ".dvc" / "cache")
    pulled = dvc(workspace, "pull")  # every out: the cache is gone, the later tests need it back
    assert snapshot(workspace / "outputs" / "data") == data, pulled.stdout
    assert json.loads(dvc(workspace, "status", "--json").stdout or "{}") == {}


# ------------------------------------------------------------------------------------------------ S3


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SPF_S3_ENDPOINT when CI started a server, else our own moto server on a free port."""
    existing = os.environ.get("SPF_S3_ENDPOINT")
    if existing:
        yield existing.rstrip("/")
        return
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start (exit {proc.poll()}); see {log.name}")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@slow
def test_push_pull_s3_remote(
    workspace: Path, reproduced: subprocess.CompletedProcess[str], s3_endpoint: str
) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
    )
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket="dvc")
    # the committed config names s3://dvc/spf; a fresh prefix keeps runs on a shared server apart
    prefix = f"spf-test-{uuid.uuid4().hex[:8]}"
    dvc(workspace, "remote", "modify", "s3", "endpointurl", s3_endpoint)
    dvc(workspace, "remote", "modify", "s3", "url", f"s3://dvc/{prefix}")
    # `-r s3` selects the S3 remote by configuration; the default stays the local folder
    assert dvc(workspace, "config", "core.remote").stdout.strip() == "local"

    data = snapshot(workspace / "outputs" / "data")
    finetune = snapshot(workspace / "outputs" / "finetune")
    dvc(workspace, "push", "-r", "s3")
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="dvc", Prefix=prefix + "/"):
        keys |= {obj["Key"] for obj in page.get("Contents", [])}
    for blob in [*data.values(), *finetune.values()]:
        h = md5(blob)
        assert f"{prefix}/files/md5/{h[:2]}/{h[2:]}" in keys, (h, sorted(keys)[:20])

    shutil.rmtree(workspace / ".dvc" / "cache")
    shutil.rmtree(workspace / "outputs" / "data")
    dvc(workspace, "pull", "-r", "s3")
    assert snapshot(workspace / "outputs" / "data") == data
    assert snapshot(workspace / "outputs" / "finetune") == finetune
    assert json.loads(dvc(workspace, "status", "--json").stdout or "{}") == {}
    cloud = dvc(workspace, "status", "-r", "s3", "--json")
    assert json.loads(cloud.stdout or "{}") == {}, cloud.stdout
