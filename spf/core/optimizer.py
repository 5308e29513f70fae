"""SPFOptimizer: wraps any torch optimizer and removes the safety component of each step.

The math lives in :mod:`spf.core.projection`; this file maps parameters to modules, decides *when* to project
(``mode``), *what* to project (``project_on``), refreshes the subspace and records diagnostics.

* ``project_on="update"`` (default): snapshot the targeted parameters, let the inner optimizer step, then
  project the actual parameter change. This is the only choice that keeps the guarantee under Adam
  (``m/√v`` is not linear in the gradient) and decoupled weight decay.
* ``project_on="grad"``: project the gradient before the inner step (PCGrad/GaLore style); exact for plain
  SGD only. Kept because it is what many papers do, and our tests show where it breaks.
* ``mode="always"`` removes the subspace component every step; ``mode="conflict"`` only when the step would
  raise the safety loss to first order, ``⟨G_k, ΔW⟩ > 0`` — per module (``conflict_scope="module"``,
  the prototype found conflict is per module) or for the whole model (``"global"``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from spf.core.distributed import broadcast_subspace
from spf.core.projection import (
    factored_inner,
    factored_sq_norm,
    lora_delta_factors,
    remove_left,
    remove_right,
)
from spf.core.subspace import SafetySubspace, subspace_overlap
from spf.models import unwrap

logger = logging.getLogger(__name__)

# The projection's vocabulary, declared once here beside the code that interprets it (configs import it).
ProjectMode = Literal["conflict", "always"]  # conflict: only when the update raises the safety loss
ProjectOn = Literal["update", "grad"]  # the optimizer's update (Adam-correct) or the raw gradient
ConflictScope = Literal["module", "global"]  # where conflict mode tests the sign of the inner product

__all__ = ["ConflictScope", "ProjectMode", "ProjectOn", "SPFOptimizer"]


@dataclass
class _LoraTarget:
    name: str
    a: nn.Parameter  # r×n
    b: nn.Parameter  # m×r
    scale: float


@dataclass
class _FullTarget:
    name: str
    w: nn.Parameter  # m×n


_Target = _LoraTarget | _FullTarget


@dataclass
class _LoraGroup:
    """Same-shaped LoRA modules (e.g. every layer's ``q_proj``) projected together with batched matmuls:
    on a small model the per-module Python and dispatch overhead, not the arithmetic, is the projection's
    cost (210 modules × ~20 small ops per step), so batching them cuts it several-fold."""

    targets: list[_LoraTarget]
    u: Tensor  # G×m×k
    s: Tensor  # G×k
    v: Tensor  # G×n×k
    scale: float


def _group_lora(targets: list[_Target], bases: dict[str, tuple[Tensor, Tensor, Tensor]]) -> list[_LoraGroup]:
    buckets: dict[tuple, list[_LoraTarget]] = {}
    for t in targets:
        if isinstance(t, _LoraTarget):
            u = bases[t.name][0]
            key = (tuple(t.a.shape), tuple(t.b.shape), t.a.dtype, t.b.dtype, t.a.device, t.scale, u.shape[1])
            buckets.setdefault(key, []).append(t)
    groups = []
    for ts in buckets.values():
        u, s, v = (torch.stack([bases[t.name][i] for t in ts]) for i in range(3))
        groups.append(_LoraGroup(ts, u, s, v, ts[0].scale))
    return groups


def _find_targets(model: nn.Module, names: list[str]) -> list[_Target]:
    """Map subspace module names to the parameters that move them — by module object, never by substring."""
    lookup = dict(unwrap(model).named_modules())
    targets: list[_Target] = []
    for name in names:
        mod = lookup.get(name)
        if mod is None:
            raise ValueError(f"subspace module '{name}' is not in the model")
        lora_a = getattr(mod, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and len(lora_a) > 0:
            active = mod.active_adapters if hasattr(mod, "active_adapters") else list(lora_a)
            if len(active) != 1:
                raise ValueError(f"{name}: exactly one active LoRA adapter is supported, found {active}")
            key = active[0]
            targets.append(
                _LoraTarget(name, lora_a[key].weight, mod.lora_B[key].weight, float(mod.scaling[key]))
            )
        elif isinstance(mod, nn.Linear) and mod.weight.requires_grad:
            targets.append(_FullTarget(name, mod.weight))
        else:
            logger.debug("module %s has no trainable weight: not projected", name)
    if not targets:
        raise ValueError("none of the subspace modules has trainable weights (LoRA or full) in this model")
    return targets


class SPFOptimizer(torch.optim.Optimizer):
    """Drop-in wrapper: ``SPFOptimizer(torch.optim.AdamW(params), model, subspace)``.

    ``param_groups`` and ``state`` are the inner optimizer's own objects, so LR schedulers, gradient
    clipping, ``transformers.Trainer(optimizers=(opt, None))`` and accelerate work unchanged.

    Args:
        optimizer: the inner optimizer (AdamW, SGD, …).
        model: the model whose modules the subspace names (a peft model or a plain transformer).
        subspace: the initial subspace; may be ``None`` when ``refresh_fn`` is given (estimated at step 0).
        mode / project_on / conflict_scope: see the module docstring.
        refresh_every: re-estimate with ``refresh_fn`` every T steps (0 = never).
        refresh_fn: returns a fresh :class:`SafetySubspace` at the current weights (same sample).
        diagnostics: compute per-step diagnostics (cheap for LoRA; for full FT with ``project_on="update"``
            it snapshots the targeted weights, one extra copy of them).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        subspace: SafetySubspace | None = None,
        *,
        mode: ProjectMode = "always",
        project_on: ProjectOn = "update",
        refresh_every: int = 0,
        refresh_fn: Callable[[], SafetySubspace] | None = None,
        conflict_scope: ConflictScope = "module",
        diagnostics: bool = True,
    ) -> None:
        if mode not in ("conflict", "always"):
            raise ValueError(f"mode must be 'conflict' or 'always', got {mode!r}")
        if project_on not in ("update", "grad"):
            raise ValueError(f"project_on must be 'update' or 'grad', got {project_on!r}")
        if conflict_scope not in ("module", "global"):
            raise ValueError(f"conflict_scope must be 'module' or 'global', got {conflict_scope!r}")
        if refresh_every < 0:
            raise ValueError(f"refresh_every must be ≥ 0, got {refresh_every}")
        if subspace is None and refresh_fn is None:
            raise ValueError("give a subspace, or a refresh_fn to estimate one")
        # Initialise the torch.optim.Optimizer machinery (hooks, isinstance checks in LR schedulers),
        # then share the inner optimizer's groups and state instead of copies.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.optimizer = optimizer
        self.model = model
        self.mode: ProjectMode = mode
        self.project_on: ProjectOn = project_on
        self.conflict_scope: ConflictScope = conflict_scope
        self.refresh_every = refresh_every
        self.refresh_fn = refresh_fn
        self.diagnostics = diagnostics
        self.num_steps = 0
        self.last_diagnostics: dict[str, float] = {}
        self.subspace: SafetySubspace | None = None
        self._targets: list[_Target] = []
        self._bases: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._groups: list[_LoraGroup] = []
        self._full: list[_FullTarget] = []
        if subspace is not None:
            self.set_subspace(subspace)

    # ------------------------------------------------------------------ delegation
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        sd["spf"] = {"num_steps": self.num_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        spf_state = state_dict.pop("spf", {})
        self.optimizer.load_state_dict(state_dict)
        self.num_steps = int(spf_state.get("num_steps", 0))
        # load_state_dict may replace the inner state object
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "optimizer"):  # called by Optimizer.__init__ before we own the inner one
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"SPFOptimizer(mode={self.mode}, project_on={self.project_on}, refresh_every={self.refresh_every}, "
            f"inner={self.optimizer.__class__.__name__})"
        )

    # ------------------------------------------------------------------ subspace
    def set_subspace(self, subspace: SafetySubspace) -> None:
        """Install a (new) subspace; bases are moved to each parameter's device once, in fp32.

        Under torch.distributed every rank adopts rank 0's subspace, so all replicas project alike.
        """
        subspace = broadcast_subspace(subspace)
        self.subspace = subspace
        self._targets = _find_targets(self.model, subspace.modules)
        self._bases = {}
        for t in self._targets:
            dev = (t.a if isinstance(t, _LoraTarget) else t.w).device
            u, s, v = subspace.bases[t.name]
            self._bases[t.name] = (
                u.to(dev, torch.float32),
                s.to(dev, torch.float32),
                v.to(dev, torch.float32),
            )
        self._groups = _group_lora(self._targets, self._bases)
        for g in self._groups:  # per-module bases become views of the stacked ones: one copy in memory
            for i, t in enumerate(g.targets):
                self._bases[t.name] = (g.u[i], g.s[i], g.v[i])
        self._full = [t for t in self._targets if isinstance(t, _FullTarget)]

    def _maybe_refresh(self) -> dict[str, float]:
        due = self.refresh_fn is not None and (
            self.subspace is None
            or (self.refresh_every > 0 and self.num_steps > 0 and self.num_steps % self.refresh_every == 0)
        )
        if not due:
            return {"spf/refreshed": 0.0}
        t0 = time.perf_counter()
        previous = self.subspace
        assert self.refresh_fn is not None
        self.set_subspace(self.refresh_fn())
        out = {"spf/refreshed": 1.0, "spf/refresh_seconds": time.perf_counter() - t0}
        if self.diagnostics and previous is not None:
            ov = subspace_overlap(previous, self.subspace)
            out["spf/overlap_prev"] = sum(ov.values()) / max(len(ov), 1)
        return out

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        diag = self._maybe_refresh()
        if self.project_on == "grad":
            loss = None
            if closure is not None:  # gradients must exist before we project them
                with torch.enable_grad():
                    loss = closure()
            with torch.no_grad():
                diag.update(self._project_grads())
            self.optimizer.step()
        else:
            with torch.no_grad():
                snap = self._snapshot()
            loss = self.optimizer.step(closure)
            with torch.no_grad():
                diag.update(self._project_updates(snap))
        self.num_steps += 1
        self.last_diagnostics = diag
        return loss

    def _snapshot(self) -> tuple[list[tuple[Tensor, Tensor]], dict[str, tuple[Tensor, ...]]]:
        """Pre-step state: stacked (A, B) per LoRA group (torch.stack copies); the k×k core per full weight."""
        lora = [
            (
                torch.stack([t.a.detach() for t in g.targets]).float(),
                torch.stack([t.b.detach() for t in g.targets]).float(),
            )
            for g in self._groups
        ]
        full: dict[str, tuple[Tensor, ...]] = {}
        for t in self._full:
            u, _, v = self._bases[t.name]
            core = u.T @ t.w.detach().float() @ v  # k×k is all the projection needs
            full[t.name] = (core, t.w.detach().clone()) if self.diagnostics else (core,)
        return lora, full

    def _decide_vec(self, inners: Tensor) -> Tensor:
        """Project which modules: all (``always``), those whose step raises the safety loss to first order
        (``conflict``, per module), or all-or-nothing on the whole model's sum (``conflict``, global)."""
        if self.mode == "always":
            return torch.ones(inners.shape, dtype=torch.bool, device=inners.device)
        if self.conflict_scope == "global":
            return (inners.sum() > 0).expand(inners.shape)
        return inners > 0

    def _decide(self, inners: dict[str, Tensor]) -> dict[str, bool]:
        if not inners:
            return {}
        return dict(zip(inners, self._decide_vec(torch.stack(list(inners.values()))).tolist(), strict=True))

    def _project_updates(
        self, snap: tuple[list[tuple[Tensor, Tensor]], dict[str, tuple[Tensor, ...]]]
    ) -> dict[str, float]:
        """Project θ_new − θ_old; LoRA: ΔB ← (I−UUᵀ)ΔB, ΔA ← ΔA(I−VVᵀ); full: ΔW ← ΔW − U(UᵀΔWV)Vᵀ."""
        lora_snap, full_snap = snap
        need_inner = self.mode == "conflict" or self.diagnostics
        # pass 1: each module's change and, when needed, its first-order effect ⟨G_k, ΔW⟩ on the safety loss
        lora_work = []
        inner_parts: list[Tensor] = []
        for g, (a_old, b_old) in zip(self._groups, lora_snap, strict=True):
            a_new = torch.stack([t.a.detach() for t in g.targets]).float()
            b_new = torch.stack([t.b.detach() for t in g.targets]).float()
            inner, factors = None, None
            if need_inner:  # always with diagnostics, which reuse the factors in pass 2
                factors = lora_delta_factors(b_old, a_old, b_new, a_new, g.scale)
                inner = factored_inner(*factors, g.u, g.s, g.v)
                inner_parts.append(inner)
            lora_work.append((a_new, b_new, inner, factors))
        full_work = []
        for t in self._full:
            u, s, v = self._bases[t.name]
            d_core = u.T @ t.w.detach().float() @ v - full_snap[t.name][0]
            inner = (d_core.diagonal() * s).sum()
            inner_parts.append(inner.reshape(1))
            full_work.append((d_core, inner))
        if need_inner:
            decision = (
                self._decide_vec(torch.cat(inner_parts)) if inner_parts else torch.zeros(0, dtype=torch.bool)
            )
        else:
            decision = torch.ones(
                sum(len(g.targets) for g in self._groups) + len(self._full), dtype=torch.bool
            )

        # pass 2: apply
        stats = _Stats()
        offset = 0
        for g, (a_old, b_old), (a_new, b_new, inner, factors) in zip(
            self._groups, lora_snap, lora_work, strict=True
        ):
            n = len(g.targets)
            mask = decision[offset : offset + n].to(a_new.device)
            offset += n
            b_proj = b_old + remove_left(b_new - b_old, g.u)
            a_proj = a_old + remove_right(a_new - a_old, g.v)
            chosen = mask.nonzero().squeeze(1).tolist()
            if chosen:
                torch._foreach_copy_([g.targets[i].b for i in chosen], [b_proj[i] for i in chosen])
                torch._foreach_copy_([g.targets[i].a for i in chosen], [a_proj[i] for i in chosen])
            if self.diagnostics:
                before_sq = factored_sq_norm(*factors)
                l2, r2 = lora_delta_factors(b_old, a_old, b_proj, a_proj, g.scale)
                # removed = s(B'A' − B''A''): factored the same way
                lr, rr = lora_delta_factors(b_proj, a_proj, b_new, a_new, g.scale)
                after = torch.where(mask, factored_inner(l2, r2, g.u, g.s, g.v), inner)
                after_sq = torch.where(mask, factored_sq_norm(l2, r2), before_sq)
                removed_sq = torch.where(mask, factored_sq_norm(lr, rr), torch.zeros_like(before_sq))
                stats.add_many(inner, after, before_sq, after_sq, removed_sq, g.s.pow(2).sum(-1), mask)
        for t, (d_core, inner) in zip(self._full, full_work, strict=True):
            u, s, v = self._bases[t.name]
            project = bool(decision[offset])
            offset += 1
            if project:
                t.w.sub_((u @ d_core @ v.T).to(t.w.dtype))
            if self.diagnostics:
                full_old = full_snap[t.name][1]
                before_sq = (t.w.detach().float() - full_old.float()).pow(2).sum()
                if project:
                    removed_sq = d_core.pow(2).sum()  # ‖U dC Vᵀ‖ = ‖dC‖ for orthonormal U, V
                    before_sq = before_sq + removed_sq  # w was already projected above
                    after_sq = before_sq - removed_sq
                    after = torch.zeros(())
                else:
                    removed_sq, after_sq, after = torch.zeros(()), before_sq, inner
                stats.add(inner, after, before_sq, after_sq, removed_sq, s, project)
        return stats.summary() if self.diagnostics else {}

    def _project_grads(self) -> dict[str, float]:
        """Project gradients; the step's direction is −g, so a conflict is ⟨G_k, −ΔW(g)⟩ > 0."""
        inners: dict[str, Tensor] = {}
        live = [t for t in self._targets if _grads_present(t)]
        for t in live:
            u, s, v = self._bases[t.name]
            if isinstance(t, _LoraTarget):
                ga, gb = t.a.grad.float(), t.b.grad.float()
                a, b = t.a.detach().float(), t.b.detach().float()
                # first-order change of W_eff for a step −g: −s(g_B A + B g_A)
                left = torch.cat([gb, b], dim=1) * -t.scale
                right = torch.cat([a, ga], dim=0)
                inners[t.name] = factored_inner(left, right, u, s, v)
            else:
                g = t.w.grad.float()
                inners[t.name] = -((u.T @ g @ v).diagonal() * s).sum()
        decision = self._decide(inners)
        stats = _Stats()
        for t in live:
            u, s, v = self._bases[t.name]
            project = decision[t.name]
            if isinstance(t, _LoraTarget):
                ga, gb = t.a.grad.float().clone(), t.b.grad.float().clone()  # grads are overwritten below
                a, b = t.a.detach().float(), t.b.detach().float()
                before_sq = factored_sq_norm(torch.cat([gb, b], 1) * t.scale, torch.cat([a, ga], 0))
                if project:
                    gb2, ga2 = remove_left(gb, u), remove_right(ga, v)
                    t.b.grad.copy_(gb2.to(t.b.grad.dtype))
                    t.a.grad.copy_(ga2.to(t.a.grad.dtype))
                    left = torch.cat([gb2, b], 1) * -t.scale
                    right = torch.cat([a, ga2], 0)
                    after, after_sq = factored_inner(left, right, u, s, v), factored_sq_norm(left, right)
                    # removed = s((g_B − g_B')A + B(g_A − g_A'))
                    removed_sq = factored_sq_norm(
                        torch.cat([gb - gb2, b], 1) * t.scale, torch.cat([a, ga - ga2], 0)
                    )
                else:
                    after, after_sq, removed_sq = inners[t.name], before_sq, torch.zeros(())
            else:
                g = t.w.grad.float().clone()
                before_sq = g.pow(2).sum()
                if project:
                    core = u.T @ g @ v
                    t.w.grad.sub_((u @ core @ v.T).to(t.w.grad.dtype))
                    removed_sq = core.pow(2).sum()
                    after_sq, after = before_sq - removed_sq, torch.zeros(())
                else:
                    after, after_sq, removed_sq = inners[t.name], before_sq, torch.zeros(())
            if self.diagnostics:
                stats.add(inners[t.name], after, before_sq, after_sq, removed_sq, s, project)
        return stats.summary() if self.diagnostics else {}


def _grads_present(t: _Target) -> bool:
    if isinstance(t, _LoraTarget):
        return t.a.grad is not None and t.b.grad is not None
    return t.w.grad is not None


class _Stats:
    """Accumulates per-module numbers into whole-model diagnostics (one float each)."""

    def __init__(self) -> None:
        self.inner_before = 0.0
        self.inner_after = 0.0
        self.before_sq = 0.0
        self.after_sq = 0.0
        self.removed_sq = 0.0
        self.g_sq = 0.0
        self.n = 0
        self.n_conflict = 0
        self.n_projected = 0

    def add(self, inner_before, inner_after, before_sq, after_sq, removed_sq, s, projected: bool) -> None:
        ib = float(inner_before)
        self.inner_before += ib
        self.inner_after += float(inner_after)
        self.before_sq += float(before_sq)
        self.after_sq += max(float(after_sq), 0.0)
        self.removed_sq += float(removed_sq)
        self.g_sq += float(s.pow(2).sum())
        self.n += 1
        self.n_conflict += ib > 0
        self.n_projected += projected

    def add_many(self, inner_before, inner_after, before_sq, after_sq, removed_sq, g_sq, projected) -> None:
        """One entry per module of a group (1-D tensors); one device→host transfer for all of them."""
        rows = torch.stack([inner_before, inner_after, before_sq, after_sq, removed_sq, g_sq]).tolist()
        for ib, ia, bs, as_, rs, gs, pr in zip(*rows, projected.tolist(), strict=True):
            self.inner_before += ib
            self.inner_after += ia
            self.before_sq += bs
            self.after_sq += max(as_, 0.0)
            self.removed_sq += rs
            self.g_sq += gs
            self.n += 1
            self.n_conflict += ib > 0
            self.n_projected += pr

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
