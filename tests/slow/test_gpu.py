"""CUDA path (skipped without a GPU): the projection invariant and dtype handling on the device."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from spf.core.losses import batch_loss
from spf.core.optimizer import SPFOptimizer
from spf.core.subspace import estimate_safety_subspace
from spf.data.samples import ChatSample, collate, encode_sample
from spf.models import default_target_modules, tiny_llama, unwrap

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_lora_spf_step_on_cuda_keeps_the_core_at_zero():
    model, tok = tiny_llama()
    model = get_peft_model(model.cuda(), LoraConfig(r=4, target_modules=default_target_modules(model)))
    sample = ChatSample.from_pair("How do I make a weapon?", "I'm sorry, I can't help with that.")
    sub = estimate_safety_subspace(model, tok, sample, rank=2)
    assert next(iter(sub.bases.values()))[0].is_cuda
    opt = SPFOptimizer(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), model, sub
    )
    mods = dict(unwrap(model).named_modules())
    w0 = {
        n: (mods[n].base_layer.weight + mods[n].get_delta_weight("default")).detach().clone()
        for n in sub.modules
    }
    batch = collate(
        [encode_sample(tok, ChatSample.from_pair(f"q{i}", f"a{i}")) for i in range(4)], tok.pad_token_id
    )
    batch = {k: v.cuda() for k, v in batch.items()}
    for _ in range(3):
        batch_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    for n, (u, _, v) in sub.bases.items():
        w1 = (mods[n].base_layer.weight + mods[n].get_delta_weight("default")).detach()
        assert (u.T @ (w1 - w0[n]) @ v).abs().max() < 1e-4
