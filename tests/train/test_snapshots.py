"""Training snapshots (``TrainConfig.snapshot_steps``): the fine-tune after step N of a longer run is the
final output of an N-step run, loadable like it, kept on resume, refused at a step the run does not have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spf.data.samples import ChatSample, save_samples
from spf.models import load_finetuned
from spf.training.checkpoint import resume_config, snapshot_dir
from spf.training.config import TrainConfig
from spf.training.loop import train

TASK = [ChatSample.from_pair(f"Say the number {i} in words", f"The number is {i}.") for i in range(12)]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    save_samples(TASK, tmp_path / "task.jsonl")
    return tmp_path / "task.jsonl"


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    # a constant learning rate (no warm-up; the schedule never decays): step 2 of a 4-step run is then
    # exactly the end of a 2-step run with the same seed and data order
    base = dict(
        model="tiny-llama", data=str(data), out=str(out), method="vanilla", steps=4, lr=1e-2, batch_size=2,
        eval_every=0, task_eval_n=0, seed=3,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    model, _ = load_finetuned("tiny-llama", folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_snapshot_equals_the_final_output_of_the_shorter_run(
    tmp_path: Path, data: Path, finetune: str
) -> None:
    kw = {"finetune": finetune, **({"lr": 1e-4} if finetune == "full" else {})}
    long_run = train(_cfg(data, tmp_path / "long", snapshot_steps=[2], **kw))
    short = train(_cfg(data, tmp_path / "short", steps=2, **kw))
    snap = snapshot_dir(long_run.out, 2)
    assert snap == tmp_path / "long" / "snapshots" / "step-2"
    _assert_same(_weights(snap), _weights(short.out))
    # and it is not simply the final output: two more steps moved the weights
    final, two = _weights(long_run.out), _weights(snap)
    assert any(not torch.allclose(final[k], two[k], atol=1e-6) for k in final)
    # the snapshot folder holds what the short run's folder holds (its metrics aside), with its config
    assert {p.name for p in snap.iterdir()} == {p.name for p in short.out.iterdir()} - {"metrics.json"}
    saved = json.loads((snap / "train_config.json").read_text())
    assert saved["steps"] == 2 and saved["snapshot_steps"] == []
    assert not list((tmp_path / "long" / "snapshots").glob(".*"))  # no temporary folder left behind


def test_a_resumed_run_keeps_its_snapshot_and_resume_off_removes_it(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "run"

    class Crash(Exception):
        pass

    def crash_at_3(rec: dict) -> None:
        if rec.get("kind") == "train" and rec["step"] == 3:
            raise Crash

    cfg = _cfg(data, out, snapshot_steps=[1, 2], save_every=1, keep_checkpoints=0)
    with pytest.raises(Crash):
        train(cfg, callback=crash_at_3)
    stamps = {s: (snapshot_dir(out, s) / "train_config.json").stat().st_mtime_ns for s in (1, 2)}
    # resuming from the step-1 checkpoint passes step 2 again: that snapshot exists and is kept
    (out / "checkpoints" / "step-000002").rename(out / "checkpoints" / ".gone")
    done = train(cfg)
    assert [r["step"] for r in done.metrics["resumes"]] == [1]
    assert {s: (snapshot_dir(out, s) / "train_config.json").stat().st_mtime_ns for s in (1, 2)} == stamps
    # snapshots are resume-neutral: they never change the resume key (nor the pipeline's cache key)
    assert resume_config(cfg) == resume_config(_cfg(data, out, save_every=1, keep_checkpoints=0))
    train(_cfg(data, out, resume=False))  # starting over: the old run's snapshots go with its checkpoints
    assert not (out / "snapshots").exists()


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ([0], "each step must be in 1..3"),
        ([4], "each step must be in 1..3"),
        ([2, 1], "sorted without repeats, got 2 before 1"),
        ([2, 2], "sorted without repeats"),
        ([True], "must be a list of integers"),
        ("2", "must be a list of integers"),
    ],
)
def test_a_bad_snapshot_step_is_refused(tmp_path: Path, data: Path, value, needle: str) -> None:
    with pytest.raises(ValueError, match="snapshot_steps: ") as err:
        _cfg(data, tmp_path / "x", snapshot_steps=value)
    assert needle in str(err.value)
    assert not (tmp_path / "x").exists()
