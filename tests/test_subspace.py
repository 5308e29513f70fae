"""Safety-subspace estimation on a tiny random Llama: exactness, LoRA at init, persistence."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from spf.data import ChatSample, collate, encode_sample
from spf.losses import per_sample_loss
from spf.models import default_target_modules, tiny_llama, unwrap
from spf.subspace import SafetySubspace, estimate_batch_subspace, estimate_safety_subspace, subspace_overlap

SAMPLE = ChatSample.from_pair("How do I pick a lock to break in?", "I'm sorry, I can't help with that.")
OTHER = ChatSample.from_pair("Write malware for me", "No. I won't write malware.")


def dense_grads(model, tok, samples) -> dict[str, torch.Tensor]:
    """Reference: ordinary autograd weight gradients of the mean per-sample loss."""
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(True)
    batch = collate([encode_sample(tok, s) for s in samples], tok.pad_token_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    per_sample_loss(out.logits, batch["labels"]).mean().backward()
    mods = dict(model.named_modules())
    return {n: mods[n].weight.grad.detach().clone() for n in default_target_modules(model)}


def projector_gap(u_a, u_b) -> float:
    return float((u_a @ u_a.T - u_b @ u_b.T).norm())


@pytest.mark.parametrize("samples", [[SAMPLE], [SAMPLE, OTHER]], ids=["single", "batch"])
def test_estimate_matches_the_dense_gradient_svd(samples):
    model, tok = tiny_llama(seed=1)
    sub = estimate_batch_subspace(model, tok, samples, rank=3)
    ref = dense_grads(model, tok, samples)
    assert set(sub.modules) == set(ref)
    for name, g in ref.items():
        u_ref, s_ref, vh_ref = torch.linalg.svd(g, full_matrices=False)
        u, s, v = sub.bases[name]
        torch.testing.assert_close(s, s_ref[:3], rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(sub.energy[name], float((g.double() ** 2).sum()), rtol=1e-3, atol=1e-9)
        assert projector_gap(u, u_ref[:, :3]) < 1e-2 * 3
        assert projector_gap(v, vh_ref[:3].T) < 1e-2 * 3
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), rtol=0, atol=1e-4)


def test_lora_at_init_uses_the_effective_weight_and_leaves_grads_alone():
    model, tok = tiny_llama(seed=2)
    plain = estimate_safety_subspace(model, tok, SAMPLE, rank=4)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=default_target_modules(model)))
    for p in peft_model.parameters():
        p.grad = None
    lora = estimate_safety_subspace(peft_model, tok, SAMPLE, rank=4)
    assert lora.modules == plain.modules
    for name in plain.modules:
        torch.testing.assert_close(lora.bases[name][1], plain.bases[name][1], rtol=1e-4, atol=1e-7)
        assert float(lora.bases[name][1][0]) > 0  # non-empty although B = 0 ⇒ ∂L/∂A = 0
    assert all(p.grad is None for p in peft_model.parameters())
    # names are the base transformer's, whatever wrapper sits around it
    assert set(lora.modules) <= set(dict(unwrap(peft_model).named_modules()))


def test_estimation_restores_training_mode():
    model, tok = tiny_llama()
    model.train()
    estimate_safety_subspace(model, tok, SAMPLE, rank=2)
    assert model.training


def test_cer_save_load_roundtrip(tmp_path):
    model, tok = tiny_llama()
    sub = estimate_safety_subspace(model, tok, SAMPLE, rank=4, model_ref="tiny-llama")
    cer1, cer5, cer_all = sub.cer(1), sub.cer(5), sub.cer(10_000)
    for name in sub.modules:
        assert 0 < cer1[name] <= cer5[name] <= cer_all[name] == pytest.approx(1.0, abs=1e-4)
    sub.save(tmp_path / "s")
    back = SafetySubspace.load(tmp_path / "s")
    assert back.rank == 4 and back.modules == sub.modules
    assert back.metadata["model_ref"] == "tiny-llama"
    assert back.metadata["sample_hash"] == sub.metadata["sample_hash"]
    for name in sub.modules:
        for a, b in zip(sub.bases[name], back.bases[name], strict=True):
            torch.testing.assert_close(a, b)
    assert back.cer(5) == pytest.approx(cer5)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["subspace.json", "subspace.safetensors"]


def test_overlap_and_truncate():
    model, tok = tiny_llama()
    a = estimate_safety_subspace(model, tok, SAMPLE, rank=4)
    b = estimate_safety_subspace(model, tok, OTHER, rank=4)
    same = subspace_overlap(a, a)
    assert min(same.values()) == pytest.approx(1.0, abs=1e-4)
    diff = subspace_overlap(a, b)
    assert sum(diff.values()) / len(diff) < 0.99
    t = a.truncate(2)
    assert t.rank == 2 and all(u.shape[1] == 2 for u, _, _ in t.bases.values())
    assert t.cer(20) == pytest.approx(a.cer(20))


def test_bad_arguments():
    model, tok = tiny_llama()
    with pytest.raises(ValueError, match="rank"):
        estimate_safety_subspace(model, tok, SAMPLE, rank=0)
    with pytest.raises(ValueError, match="not found"):
        estimate_safety_subspace(model, tok, SAMPLE, rank=2, modules=["model.layers.9.mlp.up_proj"])
    with pytest.raises(FileNotFoundError, match="spf estimate"):
        SafetySubspace.load("/nonexistent/folder")
