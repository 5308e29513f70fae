"""The mechanism controls end to end on the tiny random model: ``spf.directions: random`` and
``spf.removal: shrink`` run through the unchanged loop, record what they are, and resume exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from spf.core.subspace import SafetySubspace, subspace_overlap
from spf.training.loop import train
from tests.train.test_training import Crash, _cfg, crash_at, files  # noqa: F401  (the fixture)


def test_random_directions_are_redrawn_at_every_refresh_and_resume_exactly(files):  # noqa: F811
    def cfg(out: str, **kw):
        c = _cfg(files, files / out, save_every=2, **kw)
        c.spf.directions = "random"
        return c

    full = train(cfg("full"))
    assert full.metrics["summary"]["spf"]["directions"] == "random"
    refreshed = [s for s in full.metrics["steps"] if s.get("spf/refreshed")]
    assert len(refreshed) == 2  # steps 2 and 4 of 6 (refresh_every 2)
    assert all(s["spf/overlap_prev"] < 0.99 for s in refreshed)  # a new draw each time
    assert all(s["spf/refresh_seconds"] < 1.0 for s in refreshed)  # no estimation pass
    last = SafetySubspace.load(files / "full" / "checkpoints" / "step-000004" / "subspace")
    assert last.metadata["directions"] == "random"

    estimated = train(_cfg(files, files / "estimated", steps=3, save_every=2))
    first = SafetySubspace.load(files / "estimated" / "checkpoints" / "step-000002" / "subspace")
    assert last.effective_rank == first.effective_rank  # the ranks of the estimate, not its directions
    assert max(subspace_overlap(last, first).values()) < 0.99
    assert estimated.metrics["summary"]["spf"]["directions"] == "estimated"

    with pytest.raises(Crash):
        train(cfg("resumed"), callback=crash_at(5))
    train(cfg("resumed"))
    a = load_file(str(files / "full" / "adapter_model.safetensors"))
    b = load_file(str(files / "resumed" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_shrink_trains_and_records_the_removal(files):  # noqa: F811
    c = _cfg(files, files / "shrink", steps=3)
    c.spf.removal = "shrink"
    res = train(c)
    assert res.metrics["summary"]["spf"]["removal"] == "shrink"
    steps = res.metrics["steps"]
    assert all(0.0 < s["spf/removed_frac"] < 1.0 for s in steps)
    assert any(abs(s["spf/cos_after"]) > 1e-4 for s in steps)  # projection would make it ~0


def test_shrink_with_grad_mode_is_refused_before_any_work(files):  # noqa: F811
    with pytest.raises(ValueError, match="shrink"):
        _cfg(files, files / "bad", spf={"sample": str(files / "safety.jsonl"), "removal": "shrink",
                                        "project_on": "grad"})  # fmt: skip


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_total_change_checkpoints_its_anchor_and_resumes_exactly(files, finetune):  # noqa: F811
    def cfg(out: str):
        c = _cfg(files, files / f"{out}-{finetune}", save_every=2, finetune=finetune)
        c.spf.change = "total"
        return c

    full = train(cfg("full"))
    assert full.metrics["summary"]["spf"]["change"] == "total"
    ckpt = files / f"full-{finetune}" / "checkpoints" / "step-000004"
    anchor = load_file(str(ckpt / "spf_anchor.safetensors"))  # training's start, not step 4's weights
    if finetune == "lora":
        assert all(float(t.abs().max()) == 0.0 for k, t in anchor.items() if k.endswith(".1"))  # B₀ = 0
    with pytest.raises(Crash):
        train(cfg("resumed"), callback=crash_at(5))
    train(cfg("resumed"))
    name = "adapter_model.safetensors" if finetune == "lora" else "model.safetensors"
    a = load_file(str(files / f"full-{finetune}" / name))
    b = load_file(str(files / f"resumed-{finetune}" / name))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
