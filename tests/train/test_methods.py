"""Methods as objects (spf/training/methods.py): the registry matches the config's vocabulary, and a new method
is one class — its hooks run inside the unchanged loop."""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest
import torch
from safetensors.torch import load_file

from spf.data.samples import ChatSample, save_samples
from spf.training.config import BASELINE_METHODS, Method, TrainConfig
from spf.training.loop import train
from spf.training.methods import METHODS, Vanilla, make_method

TASK = [ChatSample.from_pair(f"Say the number {i} in words", f"The number is {i}.") for i in range(8)]


@pytest.fixture
def files(tmp_path):
    save_samples(TASK, tmp_path / "task.jsonl")
    return tmp_path


def _cfg(files, out: str, **kw) -> TrainConfig:
    base = dict(
        model="tiny-llama", data=str(files / "task.jsonl"), out=str(files / out), method="vanilla", steps=3,
        lr=1e-2, batch_size=2, eval_every=0, task_eval_n=2, lora={"r": 4},
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_the_registry_has_exactly_the_config_methods():
    assert set(METHODS) == set(get_args(Method))
    assert {name for name, cls in METHODS.items() if cls.uses_safety_data} == set(BASELINE_METHODS)
    for name, cls in METHODS.items():
        assert cls.name == name


def test_make_method_builds_the_configured_class(files):
    assert type(make_method(_cfg(files, "o"))) is METHODS["vanilla"]


class GradScale(Vanilla):
    """A control: every gradient scaled by ``factor`` after the backward pass, before clipping and the step."""

    factor = 0.0

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.calls: list[int] = []

    def after_backward(self, step: int, params: list[torch.Tensor]) -> dict[str, Any]:
        self.calls.append(step)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(self.factor)
        return {"gradscale/factor": self.factor}


def test_a_custom_method_runs_through_the_loop_by_registration_only(files, monkeypatch):
    made: list[GradScale] = []

    class Recorded(GradScale):
        def __init__(self, cfg):
            super().__init__(cfg)
            made.append(self)

    plain = train(_cfg(files, "plain"))
    monkeypatch.setitem(METHODS, "vanilla", Recorded)
    res = train(_cfg(files, "scaled"))
    assert made and made[0].calls == [0, 1, 2]  # once per optimizer step, 0-based
    assert all(s["gradscale/factor"] == 0.0 for s in res.metrics["steps"])  # its record reached metrics.json
    m = json.loads((files / "scaled" / "metrics.json").read_text())
    assert [s["gradscale/factor"] for s in m["steps"]] == [0.0, 0.0, 0.0]
    # zero gradients (no weight decay): Adam never moves the weights, so LoRA's B stays at its zero init —
    # while the plain run, same seed, moves it
    scaled = load_file(str(files / "scaled" / "adapter_model.safetensors"))
    unscaled = load_file(str(files / "plain" / "adapter_model.safetensors"))
    b_keys = [k for k in scaled if "lora_B" in k]
    assert b_keys and all(float(scaled[k].abs().max()) == 0.0 for k in b_keys)
    assert any(float(unscaled[k].abs().max()) > 0.0 for k in b_keys)
    assert plain.metrics["steps"][0]["loss"] == pytest.approx(res.metrics["steps"][0]["loss"])  # same data


def test_a_stored_subspace_matches_its_model_however_it_is_wrapped(tmp_path):
    """The train-time check (fingerprint, module shapes, weights) accepts the model the subspace was
    estimated on — plain, LoRA-wrapped or in training mode — and refuses another one, naming the folder."""
    from peft import LoraConfig, get_peft_model

    from spf.core.subspace import estimate_safety_subspace
    from spf.data.samples import DataError
    from spf.models import default_target_modules, tiny_llama
    from spf.training.methods import check_subspace_matches_model

    model, tok = tiny_llama()
    sub = estimate_safety_subspace(model, tok, TASK[0], rank=2, model_ref="tiny-llama")
    check_subspace_matches_model(sub, tmp_path, model, "tiny-llama")
    model.train()
    check_subspace_matches_model(sub, tmp_path, model, "tiny-llama")
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=default_target_modules(model)))
    check_subspace_matches_model(sub, tmp_path, lora, "tiny-llama")
    with pytest.raises(DataError, match=rf"{tmp_path}: the subspace was estimated on other weights"):
        check_subspace_matches_model(sub, tmp_path, tiny_llama(seed=5)[0], "tiny-llama:5")
    with pytest.raises(
        DataError, match=rf"{tmp_path}: the subspace was estimated on tiny-llama \(fingerprint"
    ):
        check_subspace_matches_model(sub, tmp_path, tiny_llama(hidden_size=32)[0], "other")
