"""Optimizer invariants of SPFOptimizer on a tiny net (LoRA via peft and full fine-tuning)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from spf.core.optimizer import SPFOptimizer
from spf.models import unwrap
from tests.helpers import TINY_SHAPES, TinyNet, random_subspace

SHAPES = TINY_SHAPES


def make_lora(seed: int = 0):
    torch.manual_seed(seed)
    net = TinyNet()
    model = get_peft_model(
        net, LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], lora_dropout=0.0)
    )
    # peft initialises B = 0; give B a value so both first-order terms (ΔB·A and B·ΔA) are exercised
    for mod in unwrap(model).modules():
        if hasattr(mod, "lora_B") and isinstance(mod.lora_B, nn.ModuleDict):
            nn.init.normal_(mod.lora_B["default"].weight, std=0.1)
    return model


def effective_weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in unwrap(model).named_modules():
        if name in SHAPES:
            if hasattr(mod, "get_delta_weight"):
                out[name] = (mod.base_layer.weight + mod.get_delta_weight("default")).detach().clone()
            else:
                out[name] = mod.weight.detach().clone()
    return out


def core_norms(model, w0, sub) -> dict[str, float]:
    """‖Uᵀ (W − W₀) V‖ / ‖W − W₀‖ per module: how much of the total change lies in the subspace."""
    w1 = effective_weights(model)
    out = {}
    for name, (u, _, v) in sub.bases.items():
        d = w1[name] - w0[name]
        out[name] = float((u.T @ d @ v).norm() / d.norm())
    return out


def train(model, opt, steps: int = 8, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 16, generator=gen), torch.randn(16, 8, generator=gen)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize(
    ("project_on", "kept_out"),
    [
        ("update", True),  # projecting the optimizer's update keeps the effective change out of the subspace
        ("grad", False),  # Adam's per-coordinate scaling (and weight decay) leaks it back in
    ],
)
def test_only_update_mode_keeps_the_change_out_of_the_subspace_under_adamw(lora, project_on, kept_out):
    model = make_lora() if lora else TinyNet()
    sub = random_subspace(SHAPES, rank=3)
    w0 = effective_weights(model)
    inner = torch.optim.AdamW(trainable(model), lr=1e-2, weight_decay=0.1)
    opt = SPFOptimizer(inner, model, sub, mode="always", project_on=project_on)
    train(model, opt)
    worst = max(core_norms(model, w0, sub).values())
    assert (worst < 1e-5) if kept_out else (worst > 1e-2), worst


def test_grad_mode_is_exact_for_plain_sgd_full_ft():
    model = TinyNet()
    sub = random_subspace(SHAPES, rank=3)
    w0 = effective_weights(model)
    opt = SPFOptimizer(
        torch.optim.SGD(trainable(model), lr=1e-2), model, sub, mode="always", project_on="grad"
    )
    train(model, opt)
    assert max(core_norms(model, w0, sub).values()) < 1e-5


def test_without_projection_the_change_has_a_subspace_component():
    model = make_lora()
    sub = random_subspace(SHAPES, rank=3)
    w0 = effective_weights(model)
    train(model, torch.optim.AdamW(trainable(model), lr=1e-2))
    assert min(core_norms(model, w0, sub).values()) > 1e-2


@pytest.mark.parametrize("project_on", ["update", "grad"])
def test_conflict_mode_leaves_non_conflicting_steps_untouched(project_on):
    """SGD on full FT with a hand-set gradient: g = +G_k lowers the safety loss, g = −G_k raises it."""
    sub = random_subspace(SHAPES, rank=3)
    for sign, expect_untouched in ((+1.0, True), (-1.0, False)):
        model = TinyNet()
        ref = copy.deepcopy(model)
        opt = SPFOptimizer(
            torch.optim.SGD(trainable(model), lr=0.1), model, sub, mode="conflict", project_on=project_on
        )
        for name in SHAPES:
            u, s, v = sub.bases[name]
            getattr(model, name).weight.grad = sign * (u @ torch.diag(s) @ v.T)
            getattr(model, name).bias.grad = torch.zeros_like(getattr(model, name).bias)
        opt.step()
        for name in SHAPES:
            u, s, v = sub.bases[name]
            expected = getattr(ref, name).weight - 0.1 * sign * (u @ torch.diag(s) @ v.T)
            got = getattr(model, name).weight
            if expect_untouched:
                torch.testing.assert_close(got, expected)
            else:
                assert not torch.allclose(got, expected)
                assert (u.T @ (got - getattr(ref, name).weight) @ v).abs().max() < 1e-5
        d = opt.last_diagnostics
        assert d["spf/conflict_frac"] == (0.0 if expect_untouched else 1.0)
        assert d["spf/projected_frac"] == d["spf/conflict_frac"]
        if expect_untouched:
            assert d["spf/pred_dloss_before"] < 0


def test_always_mode_projects_even_helpful_steps():
    sub = random_subspace(SHAPES, rank=3)
    model = TinyNet()
    opt = SPFOptimizer(torch.optim.SGD(trainable(model), lr=0.1), model, sub, mode="always")
    w0 = effective_weights(model)
    step = {}
    for name in SHAPES:
        u, s, v = sub.bases[name]
        getattr(model, name).weight.grad = u @ torch.diag(s) @ v.T  # a step that helps safety
        step[name] = float(0.1 * getattr(model, name).weight.grad.abs().max())  # read before the projection
    opt.step()
    # the whole step lay inside the subspace, so nothing of it is left (to float32 rounding of the step:
    # a wrong projection leaves O(step); float32 leaves ~1e-7 of it, more when MKL changes its code path)
    for name in SHAPES:
        assert (getattr(model, name).weight - w0[name]).abs().max() < 1e-5 * max(1.0, step[name])
    assert opt.last_diagnostics["spf/removed_frac"] == pytest.approx(1.0, abs=1e-4)


def test_global_conflict_scope_projects_all_or_nothing():
    sub = random_subspace(SHAPES, rank=3)
    model = TinyNet()
    opt = SPFOptimizer(
        torch.optim.SGD(trainable(model), lr=0.1), model, sub, mode="conflict", conflict_scope="global"
    )
    u1, s1, v1 = sub.bases["fc1"]
    u2, s2, v2 = sub.bases["fc2"]
    model.fc1.weight.grad = -10 * (u1 @ torch.diag(s1) @ v1.T)  # strong conflict
    model.fc2.weight.grad = 0.1 * (u2 @ torch.diag(s2) @ v2.T)  # mild help
    opt.step()
    assert opt.last_diagnostics["spf/projected_frac"] == 1.0
    assert opt.last_diagnostics["spf/conflict_frac"] == 0.5


def test_diagnostics_on_lora():
    model = make_lora()
    sub = random_subspace(SHAPES, rank=3)
    opt = SPFOptimizer(torch.optim.AdamW(trainable(model), lr=1e-2), model, sub, mode="always")
    train(model, opt, steps=1)
    d = opt.last_diagnostics
    assert abs(d["spf/cos_after"]) < 1e-4
    assert abs(d["spf/pred_dloss_after"]) < 1e-6
    assert abs(d["spf/cos_before"]) > 1e-4
    assert 0.0 < d["spf/removed_frac"] <= 1.0


def test_refresh_is_called_on_schedule_and_does_not_touch_grads():
    sub = random_subspace(SHAPES, rank=3)
    calls = []

    def refresh():
        calls.append(1)
        return random_subspace(SHAPES, rank=3, seed=len(calls))

    model = TinyNet()
    opt = SPFOptimizer(
        torch.optim.AdamW(trainable(model), lr=1e-3), model, None, refresh_every=3, refresh_fn=refresh
    )
    train(model, opt, steps=7)
    assert len(calls) == 3  # steps 0 (no initial subspace), 3 and 6
    opt2 = SPFOptimizer(
        torch.optim.AdamW(trainable(model), lr=1e-3), model, sub, refresh_every=0, refresh_fn=refresh
    )
    train(model, opt2, steps=4)
    assert len(calls) == 3  # never
    assert opt2.num_steps == 4


def test_delegation_state_dict_scheduler_and_groups():
    model = make_lora()
    sub = random_subspace(SHAPES, rank=3)
    inner = torch.optim.AdamW(trainable(model), lr=1e-2)
    opt = SPFOptimizer(inner, model, sub)
    assert opt.param_groups is inner.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    train(model, opt, steps=2)
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(5e-3)
    sd = opt.state_dict()
    assert sd["spf"]["num_steps"] == 2

    model2 = make_lora()
    opt2 = SPFOptimizer(torch.optim.AdamW(trainable(model2), lr=1e-2), model2, sub)
    opt2.load_state_dict(sd)
    assert opt2.num_steps == 2
    s1 = next(iter(inner.state.values()))
    s2 = next(iter(opt2.optimizer.state.values()))
    torch.testing.assert_close(s1["exp_avg"], s2["exp_avg"])
    opt.zero_grad()
    assert all(p.grad is None for p in trainable(model))


def test_invalid_options_fail_clearly():
    model = TinyNet()
    sub = random_subspace(SHAPES, rank=2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="mode"):
        SPFOptimizer(inner, model, sub, mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="project_on"):
        SPFOptimizer(inner, model, sub, project_on="weights")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refresh_fn"):
        SPFOptimizer(inner, model, None)
    bad = random_subspace({"nope": (4, 4)}, rank=2)
    with pytest.raises(ValueError, match="nope"):
        SPFOptimizer(inner, model, bad)


def _reference_projection(
    model_before, model_after, sub, mode: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-module reference (the unbatched formulas): for each LoRA module, B_old + (I−UUᵀ)ΔB and
    A_old + ΔA(I−VVᵀ) when it is projected, else the inner optimizer's values."""
    from spf.core.projection import factored_inner, lora_delta_factors, remove_left, remove_right

    before = dict(unwrap(model_before).named_modules())
    out = {}
    for name, mod in unwrap(model_after).named_modules():
        if name not in sub.bases:
            continue
        u, s, v = sub.bases[name]
        a_old, b_old = (
            before[name].lora_A["default"].weight.detach(),
            before[name].lora_B["default"].weight.detach(),
        )
        a_new, b_new = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
        left, right = lora_delta_factors(b_old, a_old, b_new, a_new, float(mod.scaling["default"]))
        project = mode == "always" or float(factored_inner(left, right, u, s, v)) > 0
        if project:
            out[name] = (a_old + remove_right(a_new - a_old, v), b_old + remove_left(b_new - b_old, u))
        else:
            out[name] = (a_new.clone(), b_new.clone())
    return out


@pytest.mark.parametrize("mode", ["always", "conflict"])
def test_batched_lora_groups_equal_the_per_module_formulas(mode):
    """The optimizer projects same-shaped LoRA modules (every layer's q_proj, …) in one batched call; on a
    4-layer model (4 groups of 4–8) the result must be the per-module formula's, module by module."""
    from spf.models import default_target_modules, tiny_llama

    base, _ = tiny_llama(num_layers=4)
    names = default_target_modules(base)
    lookup = dict(base.named_modules())
    sub = random_subspace({n: tuple(lookup[n].weight.shape) for n in names}, rank=3, seed=1)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for mod in unwrap(model).modules():
        if hasattr(mod, "lora_B") and isinstance(mod.lora_B, nn.ModuleDict) and "default" in mod.lora_B:
            nn.init.normal_(mod.lora_B["default"].weight, std=0.1)
    reference = copy.deepcopy(model)
    for p, q in zip(trainable(model), trainable(reference), strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt = SPFOptimizer(torch.optim.AdamW(trainable(model), lr=1e-2), model, sub, mode=mode)
    # same shape, same group: (q, o), (k, v), (gate, up), down — 28 modules in 4 batched calls
    assert sorted(len(g.targets) for g in opt._groups) == [4, 8, 8, 8]
    before = copy.deepcopy(reference)
    torch.optim.AdamW(trainable(reference), lr=1e-2).step()
    expected = _reference_projection(before, reference, sub, mode)
    opt.step()
    got = dict(unwrap(model).named_modules())
    for name, (a, b) in expected.items():
        torch.testing.assert_close(got[name].lora_A["default"].weight.detach(), a, rtol=0, atol=1e-6)
        torch.testing.assert_close(got[name].lora_B["default"].weight.detach(), b, rtol=0, atol=1e-6)
    d = opt.last_diagnostics
    if mode == "conflict":  # random gradients: some modules conflict and some do not
        assert 0.0 < d["spf/projected_frac"] < 1.0
        assert d["spf/projected_frac"] == d["spf/conflict_frac"]
    else:
        assert d["spf/projected_frac"] == 1.0
        # what is left of the first-order safety effect is fp32 rounding
        assert abs(d["spf/pred_dloss_after"]) < 1e-5 * max(1.0, abs(d["spf/pred_dloss_before"]))


def test_batched_projection_writes_bf16_parameters():
    """Groups hold fp32 math; parameters in bf16 are written back in their own dtype."""
    model = make_lora()
    model.to(torch.bfloat16)
    sub = random_subspace(SHAPES, rank=3)
    w0 = {k: v.float() for k, v in effective_weights(model).items()}
    opt = SPFOptimizer(torch.optim.SGD(trainable(model), lr=1e-1), model, sub, mode="always")
    x, y = torch.randn(16, 16, dtype=torch.bfloat16), torch.randn(16, 8, dtype=torch.bfloat16)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert all(p.dtype == torch.bfloat16 for p in trainable(model))
    ratios = core_norms_float(model, w0, sub)
    assert max(ratios.values()) < 0.05, ratios  # bf16 rounding of B and A, not a missed projection


def core_norms_float(model, w0, sub) -> dict[str, float]:
    w1 = {k: v.float() for k, v in effective_weights(model).items()}
    return {
        n: float((u.T @ (w1[n] - w0[n]) @ v).norm() / (w1[n] - w0[n]).norm())
        for n, (u, _, v) in sub.bases.items()
    }


def test_full_fine_tuning_reports_the_parameters_the_projection_does_not_cover(caplog):
    """All of the tiny Llama trainable: the subspace covers the decoder linears only, so the embeddings (and
    the LM head tied to them) and the norms would move unprojected — listed in ``opt.uncovered`` and
    warned about once; a LoRA model whose adapters all sit on subspace modules leaves nothing uncovered."""
    import logging

    from spf.core.subspace import estimate_safety_subspace
    from spf.data.samples import ChatSample
    from spf.models import default_target_modules, tiny_llama

    model, tok = tiny_llama(seed=0)
    sample = ChatSample.from_pair("How do I pick a lock?", "I can't help with that.")
    sub = estimate_safety_subspace(model, tok, sample, rank=2)
    for p in model.parameters():
        p.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="spf.core.optimizer"):
        opt = SPFOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, sub)
        opt.set_subspace(sub)  # a refresh: no second warning
    names = dict(model.named_parameters())
    covered = {f"{m}.weight" for m in sub.modules}
    assert set(opt.uncovered) == set(names) - covered
    assert "model.embed_tokens.weight" in opt.uncovered  # also the tied lm_head's weight
    assert "model.norm.weight" in opt.uncovered and "model.layers.0.input_layernorm.weight" in opt.uncovered
    warnings = [r for r in caplog.records if "not projected" in r.getMessage()]
    assert len(warnings) == 1 and str(len(opt.uncovered)) in warnings[0].getMessage()

    # parameters the inner optimizer does not step are not its concern
    opt = SPFOptimizer(torch.optim.AdamW([names[c] for c in covered], lr=1e-3), model, sub)
    assert opt.uncovered == []

    lora = get_peft_model(model, LoraConfig(r=2, target_modules=default_target_modules(model)))
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert SPFOptimizer(torch.optim.AdamW(trainable, lr=1e-3), lora, sub).uncovered == []
