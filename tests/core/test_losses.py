"""The refusal-opening unlikelihood term (an alignment lever) and the margin safety loss, on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from spf.core.losses import encode_prefix_batch, prefix_unlikelihood_loss
from spf.core.subspace import estimate_batch_subspace, margin_pair
from spf.data.samples import ChatSample, chat_prompt_ids, load_samples, save_samples
from spf.models import tiny_llama
from spf.refusal import select_safety_samples
from spf.training.config import TrainConfig
from spf.training.loop import train

PROMPTS = [ChatSample.from_pair(p) for p in ("How do I kill a Python process?", "Explain chess rules.")]


def _prefix_logprob(model, tok, sample: ChatSample, prefix: str) -> float:
    ids = chat_prompt_ids(tok, sample)
    pre = tok(prefix, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids + pre])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
    return sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(pre))


def test_unlikelihood_equals_minus_log_one_minus_p_of_the_whole_prefix():
    model, tok = tiny_llama()
    model.eval()
    prefixes = ["I'm sorry", "I cannot"]
    batch = encode_prefix_batch(tok, PROMPTS, prefixes)
    assert batch["input_ids"].shape[0] == len(PROMPTS) * len(prefixes)
    with torch.no_grad():
        got = float(prefix_unlikelihood_loss(model, batch))
    expect = [
        -math.log(1 - math.exp(_prefix_logprob(model, tok, s, pre))) for s in PROMPTS for pre in prefixes
    ]
    assert got == pytest.approx(sum(expect) / len(expect), rel=1e-4)


def test_training_with_unlikelihood_makes_the_refusal_opening_less_likely(tmp_path):
    from peft import PeftModel

    # the task teaches answering these prompts with "I…"; the unlikelihood term on the same prompts must hold
    # the opening back (a one-token prefix: the tiny random model gives longer ones ~0 probability, no gradient)
    task = [ChatSample.from_pair(s.prompt, "I") for s in PROMPTS] * 4
    save_samples(task, tmp_path / "task.jsonl")
    save_samples(PROMPTS, tmp_path / "benign.jsonl")
    common = dict(model="tiny-llama", data=str(tmp_path / "task.jsonl"), method="vanilla", steps=8, lr=2e-2,
                  batch_size=4, lora={"r": 4, "alpha": 8.0}, task_eval_n=0, resume=False)  # fmt: skip
    plain = train(TrainConfig(out=str(tmp_path / "plain"), **common))
    ul = train(
        TrainConfig(
            out=str(tmp_path / "ul"),
            unlikelihood={"data": str(tmp_path / "benign.jsonl"), "prefixes": ["I"], "weight": 5.0},
            **common,
        )
    )
    assert all("unlikelihood_loss" in h for h in ul.metrics["steps"])
    assert not any("unlikelihood_loss" in h for h in plain.metrics["steps"])

    def logp(folder: str) -> float:
        model = PeftModel.from_pretrained(tiny_llama()[0], str(tmp_path / folder)).eval()
        return sum(_prefix_logprob(model, tiny_llama()[1], s, "I") for s in PROMPTS)

    assert logp("ul") < logp("plain") - 0.5


def test_unlikelihood_settings_are_validated():
    with pytest.raises(ValueError, match=r"unlikelihood\.weight"):
        TrainConfig(model="m", data="d", out="o", method="vanilla", unlikelihood={"weight": -1})
    with pytest.raises(ValueError, match=r"unlikelihood\.prefixes"):
        TrainConfig(model="m", data="d", out="o", method="vanilla", unlikelihood={"prefixes": [""]})


def test_margin_of_a_sample_against_itself_has_zero_gradient_and_weights_must_match():
    model, tok = tiny_llama()
    s = ChatSample.from_pair("How do I build a bomb?", "I'm sorry, I can't help with that.")
    same = estimate_batch_subspace(model, tok, [s, s], rank=2, weights=[1.0, -1.0])
    assert max(same.energy.values()) < 1e-12
    samples, weights = margin_pair(s)
    assert weights == [1.0, -1.0] and samples[1].response.startswith("Sure, here is")
    sub = estimate_batch_subspace(model, tok, samples, rank=2, weights=weights)
    assert min(sub.energy.values()) > 0 and sub.metadata["weights"] == [1.0, -1.0]
    with pytest.raises(ValueError, match="weights"):
        estimate_batch_subspace(model, tok, samples, rank=2, weights=[1.0])


def test_select_safety_samples_written_paths(tmp_path):
    pairs = [ChatSample.from_pair(f"harmful {i}", f"I can't help with {i}.") for i in range(4)]
    assert select_safety_samples(None, None, pairs, own_response=False) == pairs[:1]
    assert select_safety_samples(None, None, pairs, n=3, own_response=False) == pairs[:3]
    assert select_safety_samples(None, None, pairs, index=2, own_response=False) == [pairs[2]]
    with pytest.raises(ValueError, match="index 7 out of range"):
        select_safety_samples(None, None, pairs, index=7)
    save_samples([ChatSample.from_pair("no answer")], tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match="without a written refusal"):
        select_safety_samples(None, None, load_samples(tmp_path / "p.jsonl"), own_response=False)
