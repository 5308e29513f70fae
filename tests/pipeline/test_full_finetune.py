"""`finetune.finetune: full` goes through evaluate and the gate, and its output serves through the pyfunc model:
every consumer loads "base + fine-tune output" with one helper (``spf.models.load_finetuned``)."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from spf.pipeline.gate import GateThresholds, decide
from spf.pipeline.params import PipelineParams
from spf.pipeline.stages import run_stage
from tests.helpers import stage_workspace


@pytest.fixture(scope="module")
def full_workspace(tmp_path_factory):
    torch.set_num_threads(1)
    ws, params = stage_workspace(
        tmp_path_factory.mktemp("full") / "ws",
        finetune={"finetune": "full", "method": "spf"},
        stages=("prepare", "align", "estimate", "finetune", "evaluate"),
        evaluate={"suites": ["harmful", "overrefusal", "utility"], "utility_limit": 4},
    )
    return ws, params


def test_full_finetune_output_is_a_whole_model_and_evaluates(full_workspace):
    ws, _ = full_workspace
    out = ws / "outputs" / "finetune"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    metrics = json.loads((ws / "outputs" / "eval" / "metrics.json").read_text())
    assert "harmful_rate" in metrics and 0.0 <= metrics["harmful_rate"] <= 1.0
    # the gate reads the same metrics; lenient thresholds → a decision, not an error
    lenient = GateThresholds.from_dict(
        {"max_harmful_rate": 1.0, "max_overrefusal_rate": 1.0, "min_utility": 0.0}
    )
    decision = decide(metrics, None, lenient)
    assert decision.promote, decision.reasons


def test_evaluate_uses_the_full_weights_not_the_base(full_workspace):
    """The evaluated model is the fine-tuned one: its weights equal the saved folder's, not the base's."""
    from spf.models import load_finetuned, load_model

    ws, _ = full_workspace
    with contextlib.chdir(ws):
        p = PipelineParams.from_dict(full_workspace[1], source="params.yaml")
        from spf.pipeline.stages import aligned_model_ref

        base_ref = aligned_model_ref(p)
        tuned, _ = load_finetuned(base_ref, ws / "outputs" / "finetune")
        base, _ = load_model(base_ref)
    changed = [
        n
        for (n, a), (_, b) in zip(tuned.state_dict().items(), base.state_dict().items(), strict=True)
        if not torch.equal(a, b)
    ]
    assert changed, "the full fine-tune output loaded as the unchanged base"


def test_pyfunc_model_loads_a_full_finetune(full_workspace):
    pytest.importorskip("mlflow")
    from tasks.pyfunc_model import SPFAdapterModel

    ws, params = full_workspace
    with contextlib.chdir(ws):
        p = PipelineParams.from_dict(params, source="params.yaml")
        from spf.pipeline.stages import aligned_model_ref

        base_ref = aligned_model_ref(p)
    context = SimpleNamespace(
        artifacts={"adapter": str(ws / "outputs" / "finetune")},
        model_config={"base_model": base_ref, "max_new_tokens": 3, "batch_size": 2},
    )
    model = SPFAdapterModel()
    with contextlib.chdir(ws):
        model.load_context(context)
        answers = model.predict(context, ["Say hi.", "Name a colour."])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_rerun_of_the_full_stage_reproduces_its_output(full_workspace):
    """A second run of the stage (same params, same inputs) publishes the same weights."""
    ws, params = full_workspace
    with contextlib.chdir(ws):
        p = PipelineParams.from_dict(params, source="params.yaml")
        before = (ws / "outputs" / "finetune" / "model.safetensors").read_bytes()
        run_stage("finetune", p)
        assert (ws / "outputs" / "finetune" / "model.safetensors").read_bytes() == before
