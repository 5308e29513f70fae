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


# ------------------------------------------------------------------------------ change="total" (a lever)


def _drifting(seed: int):
    """A refresh_fn whose every subspace is new: the case where per-step removal lets the sum escape."""
    counter = iter(range(seed, seed + 1000))
    return lambda: random_subspace(SHAPES, rank=3, seed=next(counter))


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize(("change", "kept_out"), [("total", True), ("step", False)])
def test_total_change_keeps_the_whole_change_off_every_new_subspace(lora, change, kept_out):
    model = make_lora() if lora else TinyNet()
    w0 = effective_weights(model)
    inner = torch.optim.AdamW(trainable(model), lr=1e-2, weight_decay=0.1)
    opt = SPFOptimizer(inner, model, None, refresh_every=1, refresh_fn=_drifting(10), change=change)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randn(16, 16, generator=gen), torch.randn(16, 8, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        w1 = effective_weights(model)
        worst = max(
            float((u.T @ (w1[n] - w0[n]) @ v).norm() / (w1[n] - w0[n]).norm())
            for n, (u, _, v) in opt.subspace.bases.items()
        )
    assert (worst < 1e-5) == kept_out, worst  # after the last step, against the last subspace


@pytest.mark.parametrize("lora", [True, False])
def test_a_restored_anchor_continues_the_run_exactly(lora):
    """A resumed run (new optimizer, the weights of step 3) with the saved anchor steps as the uninterrupted
    one; without it, it would measure the total change from the resumed weights and step differently."""
    model = make_lora() if lora else TinyNet()

    def run(m, opt, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(3):
            x, y = torch.randn(16, 16, generator=gen), torch.randn(16, 8, generator=gen)
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()

    def make(m, first_seed):  # SGD: no optimizer state, so the anchor is all a resume has to restore
        return SPFOptimizer(torch.optim.SGD(trainable(m), lr=0.05), m, None, refresh_every=1,
                            refresh_fn=_drifting(first_seed), change="total")  # fmt: skip

    a = make(model, 20)
    run(model, a, 1)  # draws subspaces 20, 21, 22
    resumed, blind = copy.deepcopy(model), copy.deepcopy(model)
    b, c = make(resumed, 23), make(blind, 23)
    b.load_anchor({k: t.clone() for k, t in a.anchor_state().items()})
    for m, opt in ((model, a), (resumed, b), (blind, c)):
        run(m, opt, 2)
    for (name, p), q, r in zip(
        model.named_parameters(), resumed.parameters(), blind.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, msg=name)
        if p.requires_grad and "bias" not in name:
            assert not torch.allclose(p, r), name
    with pytest.raises(ValueError, match="no anchor"):
        b.load_anchor({})


def test_total_change_refuses_what_it_cannot_do():
    model = make_lora()
    sub = random_subspace(SHAPES, rank=2)
    for kw in ({"project_on": "grad"}, {"removal": "shrink"}):
        with pytest.raises(ValueError, match="total"):
            SPFOptimizer(torch.optim.SGD(trainable(model), lr=0.1), model, sub, change="total", **kw)
