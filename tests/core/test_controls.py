"""The mechanism controls of SPF on a tiny net: ``removal="shrink"`` (the step's own direction at the length
projection would leave) and :func:`random_like` (random directions of the estimated ranks)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spf.core.optimizer import SPFOptimizer
from spf.core.subspace import random_like, subspace_overlap
from tests.core.test_optimizer import SHAPES, effective_weights, make_lora, trainable
from tests.helpers import TinyNet, random_subspace


def _one_step(model, sub, removal: str | None) -> dict[str, torch.Tensor]:
    """Each trainable parameter's change after one AdamW step on fixed data (plain AdamW when removal None)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    inner = torch.optim.AdamW(trainable(model), lr=1e-2, weight_decay=0.1)
    opt = inner if removal is None else SPFOptimizer(inner, model, sub, removal=removal)
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(16, 16, generator=gen), torch.randn(16, 8, generator=gen)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if n in before}


@pytest.mark.parametrize("lora", [True, False])
def test_shrink_keeps_the_steps_direction_at_the_projected_length(lora):
    model = make_lora() if lora else TinyNet()
    sub = random_subspace(SHAPES, rank=3)
    plain, projected, shrunk = (_one_step(copy.deepcopy(model), sub, r) for r in (None, "project", "shrink"))
    moved = 0
    for name, d in plain.items():
        if d.norm() == 0:
            continue
        cos = float((shrunk[name] * d).sum() / (shrunk[name].norm() * d.norm()))
        assert cos == pytest.approx(1.0, abs=1e-5), name  # the optimizer's own direction
        assert float(shrunk[name].norm()) == pytest.approx(float(projected[name].norm()), rel=1e-4), name
        moved += float((projected[name] - d).norm()) > 1e-4  # the projection changed this parameter
    assert moved >= 2  # both layers' factors (or weights) were shortened, not only left alone


def test_shrink_leaves_the_safety_component_in_the_change():
    """Unlike projection, the control removes nothing along the subspace in particular."""
    model = TinyNet()
    sub = random_subspace(SHAPES, rank=3)
    w0 = effective_weights(model)
    for removal, kept_out in (("project", True), ("shrink", False)):
        m = copy.deepcopy(model)
        _one_step(m, sub, removal)
        w1 = effective_weights(m)
        for name, (u, _, v) in sub.bases.items():
            core = float((u.T @ (w1[name] - w0[name]) @ v).norm() / (w1[name] - w0[name]).norm())
            assert (core < 1e-5) == kept_out, (removal, name, core)


def test_shrink_reports_what_it_removed():
    model = make_lora()
    sub = random_subspace(SHAPES, rank=3)
    opt = SPFOptimizer(torch.optim.SGD(trainable(model), lr=0.1), model, sub, removal="shrink")
    x = torch.randn(4, 16)
    model(x).pow(2).sum().backward()
    opt.step()
    d = opt.last_diagnostics
    assert 0.0 < d["spf/removed_frac"] < 1.0
    assert abs(d["spf/cos_after"]) > 1e-3  # the safety inner product is shortened, not zeroed


def test_shrink_needs_update_mode():
    model = make_lora()
    with pytest.raises(ValueError, match="shrink"):
        SPFOptimizer(torch.optim.SGD(trainable(model), lr=0.1), model, random_subspace(SHAPES, rank=2),
                     removal="shrink", project_on="grad")  # fmt: skip
    with pytest.raises(ValueError, match="removal"):
        SPFOptimizer(torch.optim.SGD(trainable(model), lr=0.1), model, random_subspace(SHAPES, rank=2),
                     removal="scale")  # fmt: skip


def test_random_like_has_the_ranks_not_the_directions():
    sub = random_subspace(SHAPES, rank=3)
    sub.bases["fc2"] = tuple(t[..., :2] if t.dim() > 1 else t[:2] for t in sub.bases["fc2"])  # a smaller k
    a = random_like(sub, torch.Generator().manual_seed(1))
    b = random_like(sub, torch.Generator().manual_seed(1))
    c = random_like(sub, torch.Generator().manual_seed(2))
    assert a.effective_rank == sub.effective_rank == {"fc1": 3, "fc2": 2}
    for name, (u, s, v) in a.bases.items():
        assert u.shape == sub.bases[name][0].shape and v.shape == sub.bases[name][2].shape
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(v.T @ v, torch.eye(v.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(s, sub.bases[name][1])
        assert torch.equal(u, b.bases[name][0])  # one generator state, one draw
    assert max(subspace_overlap(a, c).values()) < 0.99
    assert max(subspace_overlap(a, sub).values()) < 0.99
    assert a.metadata["directions"] == "random"
