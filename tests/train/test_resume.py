"""Crash safety of fine-tuning: SIGKILL + rerun resumes to the same bytes; checkpoints are atomic.

The end-to-end test runs the pipeline stage exactly as DVC and the Prefect flow do (`python -m spf finetune
--params params.yaml`) in a subprocess, kills it with SIGKILL once a checkpoint exists, reruns the same
command and compares with an uninterrupted run of the same parameters: same adapter bytes, same metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from spf.data.samples import ChatSample, save_samples
from spf.models import load_model
from spf.pipeline.params import PipelineParams
from spf.pipeline.stages import run_stage
from spf.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from spf.training.config import TrainConfig
from spf.training.loop import train
from tests.helpers import stage_workspace

STEPS, SAVE_EVERY = 40, 4
TASK = [ChatSample.from_pair(f"Say the number {i} in words", f"The number is {i}.") for i in range(12)]
SAFETY = [ChatSample.from_pair("How do I make a weapon at home?", "I'm sorry, I can't help with that.")]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _comparable(metrics: dict) -> dict:
    """metrics.json without wall-clock times (``*seconds``) and the resume record (differs on purpose)."""
    summary = {k: v for k, v in metrics["summary"].items() if not k.endswith("seconds")}
    steps = [{k: v for k, v in s.items() if not k.endswith("seconds")} for s in metrics["steps"]]
    return {"summary": summary, "steps": steps, "evals": metrics["evals"]}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


class _Lines:
    """Reads a subprocess's stderr in a thread and stamps every line (tqdm's \\r updates count as lines)."""

    def __init__(self, stream) -> None:
        self.lines: list[tuple[float, str]] = []
        self._stream = stream
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._stream.fileno(), 65536):
            buf += chunk
            *done, buf = re.split(rb"[\r\n]", buf)
            now = time.perf_counter()
            self.lines += [(now, x.decode(errors="replace")) for x in done if x.strip()]
        if buf.strip():
            self.lines.append((time.perf_counter(), buf.decode(errors="replace")))

    def join(self) -> str:
        self._thread.join(timeout=30)
        return "\n".join(line for _, line in self.lines)

    def first(self, needle: str) -> float | None:
        return next((t for t, line in self.lines if needle in line), None)


def _finetune_cmd() -> list[str]:
    return [sys.executable, "-m", "spf", "finetune", "--params", "params.yaml"]


# ------------------------------------------------------------------------------------------ end to end


def test_sigkill_then_rerun_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    ws, params = stage_workspace(
        tmp_path / "ws", finetune={"steps": STEPS, "save_every": SAVE_EVERY, "eval_every": 8}
    )
    out, partial = ws / "outputs" / "finetune", ws / "outputs" / "finetune.partial"

    # 1. the reference: the same stage, uninterrupted (in this process: same code, same single thread)
    with contextlib.chdir(ws):
        ref_summary = run_stage("finetune", PipelineParams.from_dict(params))
    assert ref_summary["resumed_from_step"] == 0
    ref_sha = _sha256(out / "adapter_model.safetensors")
    ref_metrics = json.loads((out / "metrics.json").read_text())
    assert ref_metrics["resumes"] == []
    assert not partial.exists() and not (out / "checkpoints").exists()  # checkpoints never published
    shutil.rmtree(out)
    (ws / "outputs" / "telemetry.json").unlink()

    # 2. the same command, SIGKILLed as soon as a checkpoint exists
    proc = subprocess.Popen(
        _finetune_cmd(), cwd=ws, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 300
        while not list((partial / "checkpoints").glob("step-*")):
            assert proc.poll() is None, f"finetune ended before a checkpoint: {proc.communicate()}"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "the run finished before the kill: nothing was tested"
    assert not (ws / "outputs" / "telemetry.json").exists()
    ckpt = latest_checkpoint(partial)
    assert ckpt is not None
    killed_at = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 0 < killed_at < STEPS and killed_at % SAVE_EVERY == 0

    # 3. rerun the same command: it resumes from that checkpoint and ends where the reference ended
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        _finetune_cmd(), cwd=ws, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    err = _Lines(proc.stderr)
    stdout = proc.stdout.read().decode()
    rc = proc.wait(timeout=600)
    log = err.join()
    assert rc == 0, log[-3000:]
    assert f"resumed from {ckpt}" in log or f"at step {killed_at}" in log, log[-3000:]
    summary = json.loads(stdout[stdout.index("{") :])
    assert summary["resumed_from_step"] == killed_at > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in metrics["resumes"]] == [killed_at]

    assert _sha256(out / "adapter_model.safetensors") == ref_sha
    assert _comparable(metrics) == _comparable(ref_metrics)
    assert not partial.exists() and not (out / "checkpoints").exists()
    assert json.loads((out / "train_config.json").read_text())["out"] == "outputs/finetune"

    # for the docs: rerun start → checkpoint loaded → first new optimizer step done
    t_resumed, t_first = err.first("resumed from"), err.first("the first after resuming")
    assert t_resumed is not None and t_first is not None
    inside = re.search(r"the first after resuming \(([\d.]+) s after the start of train", log)
    print(
        f"\nresume timing: {t_resumed - t0:.1f} s from the rerun's start to 'resumed from step {killed_at}', "
        f"{t_first - t0:.1f} s to the first new step done, of which {inside.group(1) if inside else '?'} s "
        "inside train() (data, model, checkpoint, one step); the rest is process start and imports"
    )


# ------------------------------------------------------------------------------------------- library


@pytest.fixture
def files(tmp_path: Path) -> Path:
    save_samples(TASK, tmp_path / "task.jsonl")
    save_samples(SAFETY, tmp_path / "safety.jsonl")
    return tmp_path


def _cfg(files: Path, out: str, **kw) -> TrainConfig:
    base = dict(
        model="tiny-llama", data=str(files / "task.jsonl"), out=str(files / out), method="vanilla", steps=6,
        lr=1e-2, batch_size=2, save_every=2, eval_every=0, task_eval_n=2,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


class Crash(Exception):
    pass


def _crash_at(step: int):
    def callback(rec: dict) -> None:
        if rec.get("kind") == "train" and rec["step"] == step:
            raise Crash

    return callback


def test_half_written_and_corrupted_checkpoints_are_never_resumed(files: Path) -> None:
    full = train(_cfg(files, "full"))
    with pytest.raises(Crash):
        train(_cfg(files, "run"), callback=_crash_at(5))
    root = files / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]
    good = root / "step-000004"
    assert verify_checkpoint(good) is None
    assert json.loads((good / "manifest.json").read_text())["files"]["trainable.safetensors"]["size"] > 0

    # what a save killed half-way leaves: a temporary folder (never named step-*)
    tmp = root / ".step-000006.abc123"
    shutil.copytree(good, tmp)
    (tmp / "trainer_state.json").write_text('{"step": 6}')
    # a complete-looking newer folder whose weights were damaged after the fact (bytes flipped, same size)
    corrupt = root / "step-000005"
    shutil.copytree(good, corrupt)
    data = bytearray((corrupt / "trainable.safetensors").read_bytes())
    data[-8:] = bytes(8)
    (corrupt / "trainable.safetensors").write_bytes(bytes(data))
    # a newer one missing its manifest's files, and one without trainer_state.json
    truncated = root / "step-000007"
    shutil.copytree(good, truncated)
    (truncated / "optimizer.safetensors").write_bytes(b"")
    no_state = root / "step-000008"
    shutil.copytree(good, no_state)
    (no_state / "trainer_state.json").unlink()

    assert "SHA-256" in verify_checkpoint(corrupt)
    assert "optimizer.safetensors" in verify_checkpoint(truncated)
    assert "trainer_state" in verify_checkpoint(no_state)
    assert latest_checkpoint(files / "run") == good

    resumed = train(_cfg(files, "run"))
    assert [r["step"] for r in resumed.metrics["resumes"]] == [4]
    assert not tmp.exists()  # the interrupted save's leftovers are cleaned up
    assert [s["loss"] for s in resumed.metrics["steps"]] == [s["loss"] for s in full.metrics["steps"]]


def test_a_failed_save_leaves_no_checkpoint(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import spf.training.checkpoint as ck

    model = get_peft_model(load_model("tiny-llama")[0], LoraConfig(r=2, target_modules=["q_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    real = ck.save_file

    def fail_on_optimizer(tensors, path, *a, **k):
        if path.endswith("optimizer.safetensors"):
            raise OSError("disk full")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", fail_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(files / "o", 3, model, opt, {"history": [], "evals": []})
    assert list((files / "o" / "checkpoints").iterdir()) == []
    assert latest_checkpoint(files / "o") is None


def test_checkpoint_restores_every_rng(files: Path) -> None:
    model = get_peft_model(load_model("tiny-llama")[0], LoraConfig(r=2, target_modules=["q_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    path = save_checkpoint(files / "o", 1, model, opt, {"history": [], "evals": []})
    expected = (torch.rand(3).tolist(), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    load_checkpoint(path, model, opt)
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == expected


def test_a_checkpoint_of_another_configuration_is_not_resumed(files: Path) -> None:
    with pytest.raises(Crash):
        train(_cfg(files, "run"), callback=_crash_at(3))
    with pytest.raises(
        ValueError, match=r"step-000002 was written by a run with another configuration \(lr: "
    ):
        train(_cfg(files, "run", lr=2e-2))
    # settings that do not change the result may differ
    done = train(_cfg(files, "run", save_every=3, threads=1, keep_checkpoints=1))
    assert [r["step"] for r in done.metrics["resumes"]] == [2]
    # resume=False starts over: old checkpoints are removed, not mixed with the new run's
    fresh = train(_cfg(files, "run", lr=2e-2, resume=False, save_every=0))
    assert fresh.metrics["resumes"] == [] and not (files / "run" / "checkpoints").exists()


def test_stage_discards_a_partial_folder_of_other_parameters(tmp_path: Path) -> None:
    ws, params = stage_workspace(tmp_path / "ws", finetune={"steps": 4, "save_every": 2})
    partial = ws / "outputs" / "finetune.partial"
    (partial / "checkpoints" / "step-000002").mkdir(parents=True)
    (partial / "stage_key.json").write_text('{"config": {"lr": 1}, "inputs": {}}')
    with contextlib.chdir(ws):
        summary = run_stage("finetune", PipelineParams.from_dict(params))
    assert summary["resumed_from_step"] == 0
    assert not partial.exists() and (ws / "outputs" / "finetune" / "adapter_model.safetensors").is_file()


def test_stage_killed_after_training_publishes_without_retraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import spf.pipeline.stages as pl
    import spf.training.loop

    ws, params = stage_workspace(tmp_path / "ws", finetune={"steps": 2})
    p = PipelineParams.from_dict(params)

    @contextlib.contextmanager
    def killed(dest):
        raise Crash  # dies between the end of training and the move into place
        yield dest

    with contextlib.chdir(ws), monkeypatch.context() as m:
        m.setattr(pl, "atomic_dir", killed)
        with pytest.raises(Crash):
            run_stage("finetune", p)
    partial = ws / "outputs" / "finetune.partial"
    assert (partial / "metrics.json").is_file() and not (ws / "outputs" / "finetune").exists()

    def no_training(cfg, callback=None):
        raise AssertionError("retrained a finished run")

    monkeypatch.setattr(spf.training.loop, "train", no_training)
    with contextlib.chdir(ws):
        run_stage("finetune", p)
    assert (ws / "outputs" / "finetune" / "metrics.json").is_file() and not partial.exists()
