"""SPF on the real SmolLM2-135M-Instruct (slow: loads the packaged model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spf import TrainConfig, load_model, load_samples, train
from spf.core.subspace import SafetySubspace, estimate_safety_subspace

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[2] / "spf" / "data"


def test_single_sample_subspace_and_two_spf_steps(tmp_path):
    model, tok = load_model("smollm2-135m-instruct")
    sample = load_samples(DATA / "refusals.jsonl")[0]
    sub = estimate_safety_subspace(model, tok, sample, rank=8, model_ref="smollm2-135m-instruct")
    assert len(sub.modules) == 30 * 7
    assert 0.3 < sub.mean_cer(1) < sub.mean_cer(10) < sub.mean_cer(20) <= 1.0
    sub.save(tmp_path / "sub")
    (tmp_path / "sub" / "sample.jsonl").write_text(json.dumps(sample.to_dict()) + "\n")
    assert SafetySubspace.load(tmp_path / "sub").modules == sub.modules

    res = train(
        TrainConfig(
            model="smollm2-135m-instruct",
            data=str(DATA / "sentiment.jsonl"),
            out=str(tmp_path / "ft"),
            method="spf",
            steps=2,
            batch_size=2,
            limit_data=8,
            task_eval_n=2,
            eval_every=0,
            spf={"subspace": str(tmp_path / "sub"), "rank": 8, "refresh_every": 1},
        )
    )
    last = res.metrics["steps"][-1]
    assert last["spf/refreshed"] == 1.0
    assert abs(last["spf/cos_after"]) < 1e-4
    assert 0 < last["spf/removed_frac"] < 1
    assert (tmp_path / "ft" / "adapter_model.safetensors").is_file()
