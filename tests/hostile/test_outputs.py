"""Hostile outputs: an output folder that is the package, tracked source, an input, a file, or another
process's live output. Each refused command exits 2 with one line naming the flag/key and the path, and
leaves the tree as it was (``tree_state``); two writers of one output never both "succeed".
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import spf
from spf.cli.main import main
from spf.data.samples import ChatSample, save_samples
from spf.io import OutputError, atomic_dir, atomic_path, check_output, output_lock
from spf.models import tiny_llama
from spf.pipeline.presets import smoke_params
from tests.helpers import stage_workspace, tree_state

ROOT = Path(__file__).resolve().parents[2]

PACKAGE = Path(spf.__file__).resolve().parent
TASK = [ChatSample.from_pair(f"Say the number {i}", f"The number is {i}.") for i in range(4)]


def _train_args(data: Path, out: Path, *extra: str, model: str = "tiny-llama") -> list[str]:
    return ["train", "--model", model, "--data", str(data), "--method", "vanilla", "--steps", "1",
            "--batch-size", "2", "--task-eval-n", "1", "--threads", "1", "--out", str(out), *extra]  # fmt: skip


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "task.jsonl"
    path.parent.mkdir()
    save_samples(TASK, path)
    return path


def _refused(capsys: pytest.CaptureFixture[str], args: list[str], *needles: str) -> str:
    """Run the CLI, assert exit 2 and a one-line message holding every needle; return the message."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spf: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@contextlib.contextmanager
def _holder(path: Path, *, make: Path | None = None):
    """Another process holding the output lock of ``path`` (and, optionally, writing ``make``)."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from spf.io import output_lock
        with output_lock({str(path)!r}):
            if {str(make) if make else ""!r}:
                Path({str(make)!r}).parent.mkdir(parents=True, exist_ok=True)
                Path({str(make)!r}).write_text("the holder's live file")
            print("locked", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()  # the process we started, by its handle
        proc.wait(timeout=30)


# --------------------------------------------------------------------------------------------- package


def test_workdir_in_the_package_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    # first make sure the guard refuses, so a regression cannot run `prepare` over the real spf/data
    with pytest.raises(OutputError, match="installed spf package"):
        check_output(PACKAGE / "data")
    params = smoke_params()
    params["runtime"] = {"threads": 1, "workdir": "spf"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(PACKAGE.parent)  # the workspace whose `spf/` is the package
    before = tree_state(PACKAGE / "data")
    _refused(capsys, ["prepare", "--params", str(tmp_path / "params.yaml")], "runtime.workdir", "spf package")
    assert tree_state(PACKAGE / "data") == before
    assert not list(PACKAGE.glob(".*.lock"))


def test_publishers_refuse_the_package(tmp_path: Path) -> None:
    before = tree_state(PACKAGE / "data")
    with pytest.raises(OutputError, match="spf package"), atomic_dir(PACKAGE / "data"):
        raise AssertionError("never reached")
    with pytest.raises(OutputError, match="spf package"), atomic_path(PACKAGE / "data" / "refusals.jsonl"):
        raise AssertionError("never reached")
    with pytest.raises(OutputError, match="contains the installed spf package"):
        check_output(PACKAGE.parent)
    assert tree_state(PACKAGE / "data") == before


# ----------------------------------------------------------------------------------------------- inputs


def test_train_out_is_the_model_folder(tmp_path: Path, data: Path, capsys) -> None:
    model, tok = tiny_llama()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    before = tree_state(tmp_path)
    args = _train_args(data, folder, "--finetune", "full", model=str(folder))
    _refused(capsys, args, "--out", str(folder), "--model")
    assert tree_state(tmp_path) == before  # the base weights are untouched, no lock file left


def test_train_out_is_a_data_file(tmp_path: Path, data: Path, capsys) -> None:
    before = tree_state(tmp_path)
    _refused(capsys, _train_args(data, data), "--out", "is the input --data")
    _refused(capsys, _train_args(data, data.parent), "contains the input --data")
    assert tree_state(tmp_path) == before
    # a folder beside the data file is fine
    assert check_output(data.parent / "run", inputs={"--data": str(data)}) == (data.parent / "run").resolve()


def test_train_out_is_an_existing_file(tmp_path: Path, data: Path, capsys) -> None:
    out = tmp_path / "taken.txt"
    out.write_text("someone's file")
    before = tree_state(tmp_path)
    _refused(capsys, _train_args(data, out), "--out", str(out), "not a folder")
    assert tree_state(tmp_path) == before


def test_estimate_and_align_outputs_over_their_inputs(tmp_path: Path, data: Path) -> None:
    from spf.align import AlignConfig, align
    from spf.estimate import estimate_to_folder

    model, tok = tiny_llama()
    before = tree_state(tmp_path)
    with pytest.raises(OutputError, match=r"--out .*is the input --sample"):
        estimate_to_folder(model, tok, TASK, out=data, rank=1, inputs={"--sample": str(data)})
    with pytest.raises(OutputError, match=r"--out .*lies inside the input --refusals"):
        align(AlignConfig(model="tiny-llama", out=str(data / "x"), refusals=str(data.parent)))
    assert tree_state(tmp_path) == before


# ------------------------------------------------------------------------------------------------- git


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_tracked_files_are_refused_untracked_and_ignored_allowed(tmp_path: Path, data: Path, capsys) -> None:
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "code.py").write_text("print('tracked')\n")
    (repo / "README.md").write_text("tracked\n")
    (repo / ".gitignore").write_text("ignored/\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "src/code.py", "README.md", ".gitignore"], check=True)
    before = tree_state(repo)
    with pytest.raises(OutputError, match="is a git-tracked file"), atomic_path(repo / "README.md"):
        raise AssertionError("never reached")
    with (
        pytest.raises(OutputError, match=r"holds src/code\.py, a git-tracked file"),
        atomic_dir(repo / "src"),
    ):
        raise AssertionError("never reached")
    _refused(capsys, _train_args(data, repo / "src"), "--out", "src/code.py")
    assert tree_state(repo) == before
    check_output(repo / "ignored" / "run")  # ignored: fine
    check_output(repo / "outputs")  # untracked: fine
    with atomic_dir(repo / "ignored" / "run") as tmp:
        (tmp / "a.txt").write_text("ok")
    assert (repo / "ignored" / "run" / "a.txt").is_file()
    # a result versioned on purpose (DVC `cache: false` metrics, a committed report) may be rewritten
    with atomic_path(repo / "README.md", tracked_ok=True) as tmp:
        tmp.write_text("regenerated\n")
    assert (repo / "README.md").read_text() == "regenerated\n"


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_a_stage_output_holding_tracked_files_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    ws = tmp_path / "ws"
    (ws / "outputs" / "data").mkdir(parents=True)
    (ws / "outputs" / "data" / "curated.jsonl").write_text("{}\n")  # someone committed a file there
    (ws / "outputs" / "metrics.json").write_text("{}\n")  # DVC `cache: false` metrics: tracked, fine
    params = smoke_params()
    params["runtime"] = {"threads": 1}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-C", str(ws)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "outputs/data/curated.jsonl", "outputs/metrics.json"], check=True)
    monkeypatch.chdir(ws)
    before = tree_state(ws)
    _refused(capsys, ["prepare", "--params", "params.yaml"], "runtime.workdir", "outputs/data/curated.jsonl")
    assert tree_state(ws) == before


# ---------------------------------------------------------------------------------------- one writer


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path: Path, data: Path, capsys) -> None:
    out = tmp_path / "run"
    with _holder(out, make=out / "adapter_model.safetensors") as proc:
        before = tree_state(tmp_path)
        t0 = time.perf_counter()
        _refused(
            capsys, _train_args(data, out), "--out", str(out), f"being written by pid {proc.pid}", "since"
        )
        assert time.perf_counter() - t0 < 10  # at once: no model load, no waiting
        with pytest.raises(OutputError, match=f"pid {proc.pid}"), output_lock(out):
            pass
        assert tree_state(tmp_path) == before  # the holder's files untouched
    # the holder is gone (killed: the kernel released its flock): the stale lock file locks nothing
    with output_lock(out) as lock:
        assert lock.is_file()
    assert not lock.exists()


@pytest.mark.slow  # torchrun: two processes that each pay the torch import
def test_a_refused_ddp_run_exits_on_every_rank(tmp_path: Path, data: Path) -> None:
    """Under torchrun only rank 0 takes the lock; when it is refused, every rank must exit (no rank left
    waiting at a barrier for a rank 0 that is gone)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "spf"]  # fmt: skip
    with _holder(out) as proc:
        two = subprocess.run(
            [*torchrun, *_train_args(data, out)], capture_output=True, text=True, timeout=300
        )
    assert two.returncode != 0
    assert two.stderr.count(f"being written by pid {proc.pid}") >= 2, two.stderr[-3000:]  # both ranks say why


def test_a_finished_run_of_another_seed_is_not_overwritten(tmp_path: Path, data: Path, capsys) -> None:
    out = data.parent / "run"  # beside the data file: allowed
    assert main(_train_args(data, out, "--seed", "0")) == 0
    before = tree_state(tmp_path)
    _refused(capsys, _train_args(data, out, "--seed", "1"), "--out", "seed: 0 → 1", "--no-resume")
    assert tree_state(tmp_path) == before
    assert main(_train_args(data, out, "--seed", "0", "--save-every", "1")) == 0  # same result key: fine
    assert main(_train_args(data, out, "--seed", "1", "--no-resume")) == 0  # start over, on purpose
    assert '"seed": 1' in (out / "train_config.json").read_text()


# -------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws, _ = stage_workspace(tmp_path_factory.mktemp("ws") / "ws", finetune={"steps": 2})
    return ws


@pytest.mark.parametrize("held", ["finetune", "finetune.partial"])
def test_finetune_stage_fails_at_once_while_another_writes(workspace: Path, held: str, capsys) -> None:
    outputs = workspace / "outputs"
    partial = outputs / "finetune.partial"
    partial.mkdir(exist_ok=True)
    (partial / "stage_key.json").write_text('{"another": "run"}')  # a live run's folder, of another key
    with _holder(outputs / held) as proc:
        before = tree_state(outputs)
        t0 = time.perf_counter()
        with contextlib.chdir(workspace):
            _refused(capsys, ["finetune", "--params", "params.yaml"], "runtime.workdir", f"pid {proc.pid}")
        assert time.perf_counter() - t0 < 10
        assert tree_state(outputs) == before  # finetune.partial untouched
    shutil.rmtree(partial)
    (outputs / f".{held}.lock").unlink()  # the killed holder's stale lock file (it locks nothing)


# ------------------------------------------------------------------------------ found in review (issue 14)


def test_model_caches_are_never_outputs(tmp_path: Path, data: Path, capsys, monkeypatch) -> None:
    """A packaged name (``smollm2-135m-instruct``) or a hub id is not a path check (c) can compare, but it is
    read from a cache folder: ``--out`` there would overwrite the base just as ``--out X --model X`` would."""
    monkeypatch.setenv("SPF_CACHE_DIR", str(tmp_path / "spf-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    base = tmp_path / "spf-cache" / "models" / "smollm2-135m-instruct"
    base.mkdir(parents=True)
    (base / "model.safetensors").write_text("the base weights")
    before = tree_state(tmp_path / "spf-cache")
    _refused(capsys, _train_args(data, base), "--out", "spf model cache")
    with pytest.raises(OutputError, match="Hugging Face hub cache"):
        check_output(tmp_path / "hf" / "hub" / "models--org--name")
    with pytest.raises(OutputError, match="spf model cache"):
        check_output(tmp_path)  # contains the cache
    assert tree_state(tmp_path / "spf-cache") == before
    check_output(tmp_path / "runs" / "x")  # beside the caches: fine


def test_a_second_eval_into_the_same_out_fails_at_once(tmp_path: Path, capsys) -> None:
    """Two evaluations into one --out would publish one's samples.jsonl beside the other's results.json."""
    out = tmp_path / "eval"
    with _holder(out) as proc:
        rc = main(["eval", "--model", "tiny-llama", "--suite", "harmful", "--limit", "1", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and f"pid {proc.pid}" in err, err
    assert not out.exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_the_flow_rewrites_a_tracked_params_yaml(tmp_path: Path) -> None:
    """params.yaml is tracked and rewritten on purpose (the effective parameters, as `dvc exp run -S`)."""
    pytest.importorskip("prefect")
    from spf.pipeline.params import PipelineParams
    from tasks.stages import restore_params, write_params

    repo = tmp_path / "repo"
    repo.mkdir()
    original = (ROOT / "params.yaml").read_bytes()
    (repo / "params.yaml").write_bytes(original)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml"], check=True)
    params = PipelineParams.from_dict(yaml.safe_load(original)).to_dict()
    params["finetune"]["method"] = "vanilla"
    write_params(params, repo / "params.yaml")
    assert "method: vanilla" in (repo / "params.yaml").read_text()
    restore_params(repo / "params.yaml", original)
    assert (repo / "params.yaml").read_bytes() == original
