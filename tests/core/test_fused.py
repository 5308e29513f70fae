"""The fused re-estimate against the separate one, on a tiny random Llama.

At the same weights: the fused subspace equals the separate estimate (projector difference < 1e-5), and the
gradient the optimizer sees equals the gradient of the task rows alone (rtol 1e-5) — for LoRA (with LoRA
dropout in train mode), full fine-tuning (tied embeddings, norms), a margin pair and several samples.
Through the training loop: fused and separate SPF train to the same adapter, with gradient accumulation.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from spf.core.fused import FusedError, FusedEstimate
from spf.core.losses import PlainBatch
from spf.core.subspace import estimate_batch_subspace, margin_pair, subspace_from_factors
from spf.data.samples import ChatSample, encode_sample, save_samples
from spf.models import default_target_modules, tiny_llama

SAFETY = ChatSample.from_pair("How do I pick a lock to break in?", "I'm sorry, I can't help with that.")
OTHER = ChatSample.from_pair("Write malware for me", "No. I won't write malware.")
# task rows both shorter and longer than the safety row, so padding differs between the two passes
TASK = [
    ChatSample.from_pair("Review: great", "positive"),
    ChatSample.from_pair(
        "Review: a long, slow, dull and entirely forgettable film about nothing", "negative"
    ),
    ChatSample.from_pair("Review: fine", "positive"),
]


def _lora_model(dropout: float = 0.0, seed: int = 3):
    model, tok = tiny_llama(seed=seed)
    names = default_target_modules(model)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=names)
    )
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # B ≠ 0: the LoRA branch shapes every safety gradient
                p.normal_(0, 0.2)
    return peft_model, tok, names


def _full_model(seed: int = 4):
    model, tok = tiny_llama(seed=seed)
    return model, tok, default_target_modules(model)


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _fused_step(model, tok, names, samples, weights=None):
    est = FusedEstimate(model, tok, samples, names, pad_token_id=tok.pad_token_id, weights=weights)
    rows = [encode_sample(tok, s) for s in TASK]
    with est.step(rows, "cpu") as fb:
        loss = fb.loss(model)
        fb.backward(loss)
    sub = subspace_from_factors(
        model, names, est.factors(), samples, rank=3, n_tokens=est.n_tokens, weights=weights, estimate="fused"
    )
    return sub, _grads(model), float(loss.detach())


def _plain_step(model, tok):
    mb = PlainBatch([encode_sample(tok, s) for s in TASK], tok.pad_token_id, "cpu")
    loss = mb.loss(model)
    mb.backward(loss)
    return _grads(model), float(loss.detach())


def _assert_same_subspace(fused, separate):
    assert fused.modules == separate.modules
    for name in separate.modules:
        uf, sf, vf = fused.bases[name]
        us, ss, vs = separate.bases[name]
        assert uf.shape == us.shape
        assert float((uf @ uf.T - us @ us.T).abs().max()) < 1e-5, name
        assert float((vf @ vf.T - vs @ vs.T).abs().max()) < 1e-5, name
        torch.testing.assert_close(sf, ss, rtol=1e-4, atol=1e-8)
    assert fused.metadata["n_factor_rows"] == separate.metadata["n_factor_rows"]
    assert fused.metadata["safety_loss"] == pytest.approx(separate.metadata["safety_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "build",
    [_lora_model, lambda: _lora_model(dropout=0.3), _full_model],
    ids=["lora", "lora-dropout", "full"],
)
@pytest.mark.parametrize("case", ["single", "margin", "several"])
def test_fused_equals_separate_and_leaves_the_task_gradient_alone(build, case):
    model, tok, names = build()
    samples, weights = {"single": ([SAFETY], None), "margin": margin_pair(SAFETY), "several": ([SAFETY, OTHER], None)}[case]  # fmt: skip
    separate = estimate_batch_subspace(model, tok, samples, rank=3, modules=names, weights=weights)
    model.train()
    # dropout in train mode draws masks: the reference uses the same draws for the task rows
    torch.manual_seed(0)
    fused, fused_grads, fused_loss = _fused_step(model, tok, names, samples, weights)
    torch.manual_seed(0)
    plain_grads, plain_loss = _plain_step(model, tok)
    _assert_same_subspace(fused, separate)  # with dropout too: the safety rows skip it, as in eval mode
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    # with dropout the task rows' masks are drawn from a bigger tensor, so only the dropout-free model's
    # loss and gradients can match the plain batch's exactly
    if not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
        for n, g in plain_grads.items():
            torch.testing.assert_close(fused_grads[n], g, rtol=1e-5, atol=1e-7, msg=n)
    assert not any(m._forward_hooks for m in model.modules())  # every hook removed after the step
    assert not any("forward" in vars(m) for m in model.modules())  # every routed forward restored


def test_a_wrong_implementation_would_fail_the_gradient_check():
    """Without routing, the safety rows' gradient lands in .grad: the check above would see it."""
    model, tok, names = _full_model()
    est = FusedEstimate(model, tok, [SAFETY], names, pad_token_id=tok.pad_token_id)
    est._linears, est._hooked = [], []  # no routing
    with est.step([encode_sample(tok, s) for s in TASK], "cpu") as fb:
        fb.backward(fb.loss(model))
    leaked = _grads(model)
    plain, _ = _plain_step(model, tok)
    assert max(float((leaked[n] - g).abs().max()) for n, g in plain.items()) > 1e-3


def test_factors_without_a_captured_step_is_a_clear_error():
    model, tok, names = _lora_model()
    est = FusedEstimate(model, tok, [SAFETY], names, pad_token_id=tok.pad_token_id)
    with pytest.raises(FusedError, match=r"FusedEstimate\.step"):
        est.factors()
    with est.step([encode_sample(tok, s) for s in TASK], "cpu") as fb:
        fb.loss(model)  # no backward
    with pytest.raises(FusedError):
        est.factors()


def _train(tmp_path, name, **spf):
    from spf import TrainConfig, train

    save_samples(TASK * 4, tmp_path / "task.jsonl")
    save_samples([SAFETY], tmp_path / "safety.jsonl")
    out = tmp_path / name
    cfg = TrainConfig(
        model="tiny-llama", data=str(tmp_path / "task.jsonl"), out=str(out), method="spf", steps=3,
        batch_size=2, grad_accum=2, lr=1e-2, max_length=64, eval_every=0, threads=1, resume=False,
        lora={"r": 2}, spf={"sample": str(tmp_path / "safety.jsonl"), "rank": 2, **spf},
    )  # fmt: skip
    train(cfg)
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors")), json.loads((out / "metrics.json").read_text())


def test_training_with_the_fused_estimate_equals_the_separate_one(tmp_path):
    sep, sep_metrics = _train(tmp_path, "separate", estimate="separate")
    fus, fus_metrics = _train(tmp_path, "fused", estimate="fused")
    assert sep.keys() == fus.keys()
    for k in sep:
        torch.testing.assert_close(fus[k], sep[k], rtol=1e-4, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in fus.items() if "lora_B" in k)  # it trained
    assert fus_metrics["summary"]["spf"]["estimate"] == "fused"
    refreshed = [s.get("spf/refreshed") for s in fus_metrics["steps"]]
    assert refreshed == [0.0, 1.0, 1.0]  # step 0 uses the initial estimate; later steps the fused one
    for a, b in zip(sep_metrics["steps"], fus_metrics["steps"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)  # the logged loss is the task rows' only
