"""What SPFOptimizer projects: the parameters behind each subspace module, and one projector per kind.

A subspace module is moved either by a LoRA pair (B m×r, A r×n, effective ``W₀ + s·B·A``) or by its full
weight. The four cases {update, grad} × {LoRA, full} each get a small object whose methods follow the
optimizer's two passes — *measure* (the change and its first-order effect ``⟨G_k, ΔW⟩`` on the safety loss)
and *apply* (remove the safety component where the decision says so, record diagnostics) — and whose
math is :mod:`spf.core.projection`'s:

* :class:`LoraGroup` — same-shaped LoRA modules projected together (update mode);
* :class:`FullProjector` — a full weight, two-sided (update and grad mode);
* :class:`LoraGradProjector` — one LoRA module's gradients (grad mode);
* :class:`TotalLoraGroup`, :class:`TotalFullProjector` — ``change="total"``: the total change since an
  anchor (training's start) is kept off the current subspace, not only the step's;
* :class:`ShrinkLoraGroup`, :class:`ShrinkFullProjector` — the norm-matched control (``removal="shrink"``):
  the step keeps its own direction at the length the projection would leave it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from spf.core.projection import (
    core_inner,
    expand_core,
    factored_inner,
    factored_sq_norm,
    lora_delta_factors,
    lora_step_factors,
    remove_left,
    remove_right,
    two_sided_core,
)
from spf.data.samples import DataError
from spf.models import unwrap

logger = logging.getLogger(__name__)

__all__ = [
    "Anchor",
    "Bases",
    "FullProjector",
    "FullTarget",
    "LoraGradProjector",
    "LoraGroup",
    "LoraTarget",
    "ShrinkFullProjector",
    "ShrinkLoraGroup",
    "Stats",
    "TotalFullProjector",
    "TotalLoraGroup",
    "find_targets",
    "grads_present",
    "group_lora",
    "target_parameters",
    "uncovered_parameters",
]

Bases = tuple[Tensor, Tensor, Tensor]  # U (m×k), S (k), V (n×k), fp32 on the parameter's device


@dataclass
class LoraTarget:
    name: str
    a: nn.Parameter  # r×n
    b: nn.Parameter  # m×r
    scale: float


@dataclass
class FullTarget:
    name: str
    w: nn.Parameter  # m×n


Target = LoraTarget | FullTarget


def target_parameters(t: Target) -> tuple[nn.Parameter, ...]:
    return (t.a, t.b) if isinstance(t, LoraTarget) else (t.w,)


def grads_present(t: Target) -> bool:
    return all(p.grad is not None for p in target_parameters(t))


def uncovered_parameters(model: nn.Module, targets: list[Target], stepped: list[nn.Parameter]) -> list[str]:
    """Names (as in the unwrapped model) of the parameters that require grad and are in ``stepped`` (what
    the inner optimizer steps) but belong to no target. A full fine-tune that trains the embeddings or
    norms would otherwise lose the guarantee silently: the projection only sees the subspace's linears."""
    covered = {id(p) for t in targets for p in target_parameters(t)}
    stepped_ids = {id(p) for p in stepped}
    return [
        name
        for name, p in unwrap(model).named_parameters()
        if p.requires_grad and id(p) in stepped_ids and id(p) not in covered
    ]


def find_targets(model: nn.Module, names: list[str]) -> list[Target]:
    """Map subspace module names to the parameters that move them — by module object, never by substring."""
    lookup = dict(unwrap(model).named_modules())
    targets: list[Target] = []
    for name in names:
        mod = lookup.get(name)
        if mod is None:
            raise DataError(
                f"subspace module '{name}' is not in the model (estimated on another architecture?)"
            )
        lora_a = getattr(mod, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and len(lora_a) > 0:
            active = mod.active_adapters if hasattr(mod, "active_adapters") else list(lora_a)
            if len(active) != 1:
                raise ValueError(f"{name}: exactly one active LoRA adapter is supported, found {active}")
            key = active[0]
            targets.append(
                LoraTarget(name, lora_a[key].weight, mod.lora_B[key].weight, float(mod.scaling[key]))
            )
        elif isinstance(mod, nn.Linear) and mod.weight.requires_grad:
            targets.append(FullTarget(name, mod.weight))
        else:
            logger.debug("module %s has no trainable weight: not projected", name)
    if not targets:
        raise ValueError("none of the subspace modules has trainable weights (LoRA or full) in this model")
    return targets


# ---------------------------------------------------------------------------------------- diagnostics


@dataclass
class Stats:
    """Accumulates per-module numbers into whole-model diagnostics (one float each)."""

    inner_before: float = 0.0
    inner_after: float = 0.0
    before_sq: float = 0.0
    after_sq: float = 0.0
    removed_sq: float = 0.0
    g_sq: float = 0.0
    n: int = 0
    n_conflict: int = 0
    n_projected: int = 0

    def add(self, inner_before, inner_after, before_sq, after_sq, removed_sq, s, projected: bool) -> None:
        self._add_row(
            float(inner_before),
            float(inner_after),
            float(before_sq),
            float(after_sq),
            float(removed_sq),
            float(s.pow(2).sum()),
            projected,
        )

    def add_many(self, inner_before, inner_after, before_sq, after_sq, removed_sq, g_sq, projected) -> None:
        """One entry per module of a group (1-D tensors); one device→host transfer for all of them."""
        rows = torch.stack([inner_before, inner_after, before_sq, after_sq, removed_sq, g_sq]).tolist()
        for row in zip(*rows, projected.tolist(), strict=True):
            self._add_row(*row)

    def _add_row(self, ib, ia, bs, as_, rs, gs, projected) -> None:
        self.inner_before += ib
        self.inner_after += ia
        self.before_sq += bs
        self.after_sq += max(as_, 0.0)
        self.removed_sq += rs
        self.g_sq += gs
        self.n += 1
        self.n_conflict += ib > 0
        self.n_projected += projected

    def summary(self) -> dict[str, float]:
        g = self.g_sq**0.5
        nb, na = self.before_sq**0.5, self.after_sq**0.5
        return {
            # ⟨G_k, ΔW⟩ summed over modules: the predicted first-order change of the safety loss
            "spf/pred_dloss_before": self.inner_before,
            "spf/pred_dloss_after": self.inner_after,
            "spf/cos_before": self.inner_before / (g * nb) if g * nb > 0 else 0.0,
            "spf/cos_after": self.inner_after / (g * na) if g * na > 0 else 0.0,
            "spf/removed_frac": (self.removed_sq**0.5) / nb if nb > 0 else 0.0,
            "spf/conflict_frac": self.n_conflict / self.n if self.n else 0.0,
            "spf/projected_frac": self.n_projected / self.n if self.n else 0.0,
        }


# ------------------------------------------------------------------------------------ update mode


@dataclass
class LoraGroup:
    """Same-shaped LoRA modules (e.g. every layer's ``q_proj``) projected together with batched matmuls:
    on a small model the per-module Python and dispatch overhead, not the arithmetic, is the projection's
    cost (210 modules × ~20 small ops per step), so batching them cuts it several-fold.

    Update mode: ΔB ← (I − UUᵀ)ΔB, ΔA ← ΔA(I − VVᵀ) — the effective change then has no component
    ``Uᵀ(·)V`` at all, exactly (:mod:`spf.core.projection`)."""

    targets: list[LoraTarget]
    u: Tensor  # G×m×k
    s: Tensor  # G×k
    v: Tensor  # G×n×k
    scale: float
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.targets)

    def _stacked(self) -> tuple[Tensor, Tensor]:
        return (
            torch.stack([t.a.detach() for t in self.targets]).float(),
            torch.stack([t.b.detach() for t in self.targets]).float(),
        )

    def snapshot(self, keep_copy: bool = False) -> tuple[Tensor, Tensor]:
        """Pre-step (A, B), stacked (torch.stack copies; they serve the diagnostics too)."""
        return self._stacked()

    def measure(self, snap: tuple[Tensor, Tensor], need_inner: bool) -> tuple:
        """Post-step (A, B), and with ``need_inner`` the change's factors and ⟨G_k, ΔW⟩ per module (last)."""
        a_old, b_old = snap
        a_new, b_new = self._stacked()
        inner, factors = None, None
        if need_inner:  # always with diagnostics, which reuse the factors in apply()
            factors = lora_delta_factors(b_old, a_old, b_new, a_new, self.scale)
            inner = factored_inner(*factors, self.u, self.s, self.v)
        return a_new, b_new, factors, inner

    def apply(self, snap: tuple[Tensor, Tensor], work: tuple, mask: Tensor, stats: Stats | None) -> None:
        a_old, b_old = snap
        a_new, b_new, factors, inner = work
        mask = mask.to(a_new.device)
        b_proj, a_proj = self.kept(a_old, b_old, a_new, b_new)
        chosen = mask.nonzero().squeeze(1).tolist()
        if chosen:
            torch._foreach_copy_([self.targets[i].b for i in chosen], [b_proj[i] for i in chosen])
            torch._foreach_copy_([self.targets[i].a for i in chosen], [a_proj[i] for i in chosen])
        if stats is None:
            return
        before_sq = factored_sq_norm(*factors)
        l2, r2 = lora_delta_factors(b_old, a_old, b_proj, a_proj, self.scale)
        # removed = s(B'A' − B''A''): factored the same way
        lr, rr = lora_delta_factors(b_proj, a_proj, b_new, a_new, self.scale)
        after = torch.where(mask, factored_inner(l2, r2, self.u, self.s, self.v), inner)
        after_sq = torch.where(mask, factored_sq_norm(l2, r2), before_sq)
        removed_sq = torch.where(mask, factored_sq_norm(lr, rr), torch.zeros_like(before_sq))
        stats.add_many(inner, after, before_sq, after_sq, removed_sq, self.s.pow(2).sum(-1), mask)

    def kept(self, a_old: Tensor, b_old: Tensor, a_new: Tensor, b_new: Tensor) -> tuple[Tensor, Tensor]:
        """(B, A) after a projected step: the safety component of each factor's change removed."""
        return b_old + remove_left(b_new - b_old, self.u), a_old + remove_right(a_new - a_old, self.v)


Anchor = dict[
    str, tuple[Tensor, ...]
]  # module name → its parameters at training's start (target_parameters order)


@dataclass
class TotalLoraGroup(LoraGroup):
    """``change="total"``: B − B₀ ← (I − UUᵀ)(B − B₀), A − A₀ ← (A − A₀)(I − VVᵀ) against the anchor (B₀, A₀),
    so the whole change s(BA − B₀A₀) has no ``Uᵀ(·)V`` component for the current subspace."""

    a0: Tensor | None = None  # G×r×n
    b0: Tensor | None = None  # G×m×r

    def set_anchor(self, anchor: Anchor) -> None:
        self.a0 = torch.stack([anchor[t.name][0] for t in self.targets]).float()
        self.b0 = torch.stack([anchor[t.name][1] for t in self.targets]).float()

    def kept(self, a_old: Tensor, b_old: Tensor, a_new: Tensor, b_new: Tensor) -> tuple[Tensor, Tensor]:
        assert self.a0 is not None and self.b0 is not None, "TotalLoraGroup without an anchor"
        return self.b0 + remove_left(b_new - self.b0, self.u), self.a0 + remove_right(a_new - self.a0, self.v)


def shrunk(delta: Tensor, kept: Tensor) -> Tensor:
    """``delta`` scaled to ``kept``'s norm, per leading index (a zero ``delta`` stays zero)."""
    dims = tuple(range(1, delta.dim()))
    norm = delta.norm(dim=dims, keepdim=True)
    return delta * torch.where(norm > 0, kept.norm(dim=dims, keepdim=True) / norm.clamp_min(1e-30), 0.0)


class ShrinkLoraGroup(LoraGroup):
    """The control: each factor's change keeps the optimizer's direction, shortened to the norm the
    projection would leave — the same amount removed, none of it along the safety directions in particular."""

    def kept(self, a_old: Tensor, b_old: Tensor, a_new: Tensor, b_new: Tensor) -> tuple[Tensor, Tensor]:
        b_proj, a_proj = super().kept(a_old, b_old, a_new, b_new)
        return b_old + shrunk(b_new - b_old, b_proj - b_old), a_old + shrunk(a_new - a_old, a_proj - a_old)


def group_lora(
    targets: list[Target], bases: dict[str, Bases], cls: type[LoraGroup] = LoraGroup
) -> list[LoraGroup]:
    buckets: dict[tuple, list[LoraTarget]] = {}
    for t in targets:
        if isinstance(t, LoraTarget):
            u = bases[t.name][0]
            key = (tuple(t.a.shape), tuple(t.b.shape), t.a.dtype, t.b.dtype, t.a.device, t.scale, u.shape[1])
            buckets.setdefault(key, []).append(t)
    groups = []
    for ts in buckets.values():
        u, s, v = (torch.stack([bases[t.name][i] for t in ts]) for i in range(3))
        groups.append(cls(ts, u, s, v, ts[0].scale))
    return groups


@dataclass
class FullProjector:
    """A full weight: ΔW ← ΔW − U(UᵀΔWV)Vᵀ (update mode), g ← g − U(UᵀgV)Vᵀ (grad mode). Only the k×k core
    ``UᵀWV`` is snapshotted (plus a copy of W for diagnostics)."""

    target: FullTarget
    u: Tensor
    s: Tensor
    v: Tensor
    size: int = 1

    def snapshot(self, keep_copy: bool) -> tuple[Tensor, ...]:
        w = self.target.w.detach()
        core = two_sided_core(w.float(), self.u, self.v)  # k×k is all the projection needs
        return (core, w.clone()) if keep_copy else (core,)

    def measure(self, snap: tuple[Tensor, ...], need_inner: bool) -> tuple[Tensor, Tensor]:
        """The core's change and ⟨G_k, ΔW⟩ (last; computed always: it costs a k-vector)."""
        d_core = two_sided_core(self.target.w.detach().float(), self.u, self.v) - snap[0]
        return d_core, core_inner(d_core, self.s).reshape(1)

    def apply(self, snap: tuple[Tensor, ...], work: tuple, mask: Tensor, stats: Stats | None) -> None:
        d_core, inner = work
        inner = inner.reshape(())
        w = self.target.w
        project = bool(mask[0])
        if project:
            w.sub_(expand_core(d_core, self.u, self.v).to(w.dtype))
        if stats is None:
            return
        before_sq = (w.detach().float() - snap[1].float()).pow(2).sum()
        if project:
            removed_sq = d_core.pow(2).sum()  # ‖U dC Vᵀ‖ = ‖dC‖ for orthonormal U, V
            before_sq = before_sq + removed_sq  # w was already projected above
            after_sq, after = before_sq - removed_sq, torch.zeros(())
        else:
            removed_sq, after_sq, after = torch.zeros(()), before_sq, inner
        stats.add(inner, after, before_sq, after_sq, removed_sq, self.s, project)

    # grad mode: the step's direction is −g, so a conflict is ⟨G_k, −g⟩ > 0
    def grad_inner(self) -> Tensor:
        return -core_inner(two_sided_core(self.target.w.grad.float(), self.u, self.v), self.s)

    def project_grad(self, project: bool, inner: Tensor, stats: Stats | None) -> None:
        w = self.target.w
        g = w.grad.float().clone()
        before_sq = g.pow(2).sum()
        if project:
            core = two_sided_core(g, self.u, self.v)
            w.grad.sub_(expand_core(core, self.u, self.v).to(w.grad.dtype))
            removed_sq = core.pow(2).sum()
            after_sq, after = before_sq - removed_sq, torch.zeros(())
        else:
            after, after_sq, removed_sq = inner, before_sq, torch.zeros(())
        if stats is not None:
            stats.add(inner, after, before_sq, after_sq, removed_sq, self.s, project)


@dataclass
class TotalFullProjector(FullProjector):
    """``change="total"`` for a full weight: W ← W − U Uᵀ(W − W₀)V Vᵀ against the anchor W₀ (a copy of the
    targeted weight, kept for the whole run)."""

    w0: Tensor | None = None

    def set_anchor(self, anchor: Anchor) -> None:
        self.w0 = anchor[self.target.name][0]

    def apply(self, snap: tuple[Tensor, ...], work: tuple, mask: Tensor, stats: Stats | None) -> None:
        assert self.w0 is not None, "TotalFullProjector without an anchor"
        inner = work[1].reshape(())
        w = self.target.w
        project = bool(mask[0])
        total = two_sided_core(w.detach().float() - self.w0.float(), self.u, self.v)
        if project:
            w.sub_(expand_core(total, self.u, self.v).to(w.dtype))
        if stats is None:
            return
        step = w.detach().float() - snap[1].float()  # the step as applied (its old state: the copy)
        removed_sq = total.pow(2).sum() if project else torch.zeros(())
        after = core_inner(two_sided_core(step, self.u, self.v), self.s)
        after_sq = step.pow(2).sum()
        before_sq = (step + expand_core(total, self.u, self.v)).pow(2).sum() if project else after_sq
        stats.add(inner, after, before_sq, after_sq, removed_sq, self.s, project)


class ShrinkFullProjector(FullProjector):
    """The control for a full weight: ΔW ← c·ΔW with ‖c·ΔW‖ = ‖ΔW − UUᵀΔWVVᵀ‖ (update mode only; it keeps a
    copy of the weight, which the projection does not need)."""

    def snapshot(self, keep_copy: bool) -> tuple[Tensor, ...]:
        return super().snapshot(True)

    def apply(self, snap: tuple[Tensor, ...], work: tuple, mask: Tensor, stats: Stats | None) -> None:
        d_core, inner = work
        inner = inner.reshape(())
        w, w_old = self.target.w, snap[1]
        delta = w.detach().float() - w_old.float()
        before_sq = delta.pow(2).sum()
        project = bool(mask[0])
        c = ((before_sq - d_core.pow(2).sum()).clamp_min(0) / before_sq).sqrt() if before_sq > 0 else 1.0
        c = torch.as_tensor(c if project else 1.0, dtype=torch.float32)
        if project:
            w.copy_((w_old.float() + c * delta).to(w.dtype))
        if stats is not None:
            stats.add(
                inner, c * inner, before_sq, c**2 * before_sq, (1 - c) ** 2 * before_sq, self.s, project
            )


# -------------------------------------------------------------------------------------- grad mode


@dataclass
class LoraGradProjector:
    """One LoRA module's gradients: g_B ← (I − UUᵀ)g_B, g_A ← g_A(I − VVᵀ) (exact for plain SGD only)."""

    target: LoraTarget
    u: Tensor
    s: Tensor
    v: Tensor

    def _factors(self, g_b: Tensor, g_a: Tensor) -> tuple[Tensor, Tensor]:
        """First-order change of W_eff along (g_B, g_A): s(g_B A + B g_A), factored."""
        t = self.target
        return lora_step_factors(t.b.detach().float(), t.a.detach().float(), g_b, g_a, t.scale)

    def grad_inner(self) -> Tensor:
        left, right = self._factors(self.target.b.grad.float(), self.target.a.grad.float())
        return -factored_inner(left, right, self.u, self.s, self.v)  # the step is −g

    def project_grad(self, project: bool, inner: Tensor, stats: Stats | None) -> None:
        t = self.target
        g_a, g_b = t.a.grad.float().clone(), t.b.grad.float().clone()  # grads are overwritten below
        before_sq = factored_sq_norm(*self._factors(g_b, g_a))
        if project:
            g_b2, g_a2 = remove_left(g_b, self.u), remove_right(g_a, self.v)
            t.b.grad.copy_(g_b2.to(t.b.grad.dtype))
            t.a.grad.copy_(g_a2.to(t.a.grad.dtype))
            left, right = self._factors(g_b2, g_a2)
            after, after_sq = (
                -factored_inner(left, right, self.u, self.s, self.v),
                factored_sq_norm(left, right),
            )
            # removed = s((g_B − g_B')A + B(g_A − g_A'))
            removed_sq = factored_sq_norm(*self._factors(g_b - g_b2, g_a - g_a2))
        else:
            after, after_sq, removed_sq = inner, before_sq, torch.zeros(())
        if stats is not None:
            stats.add(inner, after, before_sq, after_sq, removed_sq, self.s, project)
