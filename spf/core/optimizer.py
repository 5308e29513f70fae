"""SPFOptimizer: wraps any torch optimizer and removes the safety component of each step.

The math lives in :mod:`spf.core.projection`, the per-target projectors in :mod:`spf.core.targets`; this
file decides *when* to project (``mode``), *what* to project (``project_on``), refreshes the subspace and
collects diagnostics.

* ``project_on="update"`` (default): snapshot the targeted parameters, let the inner optimizer step, then
  project the actual parameter change. This is the only choice that keeps the guarantee under Adam
  (``m/√v`` is not linear in the gradient) and decoupled weight decay.
* ``project_on="grad"``: project the gradient before the inner step (PCGrad/GaLore style); exact for plain
  SGD only. Kept because it is what many papers do, and our tests show where it breaks.
* ``change="total"`` keeps the *total* change since the anchor (the parameters when the optimizer first
  got a subspace, or :meth:`SPFOptimizer.load_anchor`'s) off the current subspace at every step, not only
  the step's increment — per-step removal bounds each step's first-order effect, nothing bounds their sum.
  Update mode only; for full fine-tuning it keeps an fp32 copy of every targeted weight.
* ``removal="shrink"`` is a control, not SPF: every projected step keeps its own direction at the length the
  projection would leave (:class:`~spf.core.targets.ShrinkLoraGroup`) — update mode only.
* ``mode="always"`` removes the subspace component every step; ``mode="conflict"`` only when the step would
  raise the safety loss to first order, ``⟨G_k, ΔW⟩ > 0`` — per module (``conflict_scope="module"``,
  the prototype found conflict is per module) or for the whole model (``"global"``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, get_args

import torch
from torch import Tensor, nn

from spf.core.distributed import broadcast_subspace
from spf.core.modes import ConflictScope, ProjectedChange, ProjectMode, ProjectOn, Removal  # re-exported
from spf.core.subspace import SafetySubspace, subspace_overlap
from spf.core.targets import (
    Anchor,
    Bases,
    FullProjector,
    FullTarget,
    LoraGradProjector,
    LoraGroup,
    LoraTarget,
    ShrinkFullProjector,
    ShrinkLoraGroup,
    Stats,
    TotalFullProjector,
    TotalLoraGroup,
    find_targets,
    grads_present,
    group_lora,
    target_parameters,
    uncovered_parameters,
)

logger = logging.getLogger(__name__)

__all__ = ["ConflictScope", "ProjectMode", "ProjectOn", "ProjectedChange", "Removal", "SPFOptimizer"]


class SPFOptimizer(torch.optim.Optimizer):
    """Drop-in wrapper: ``SPFOptimizer(torch.optim.AdamW(params), model, subspace)``.

    ``param_groups`` and ``state`` are the inner optimizer's own objects, so LR schedulers, gradient
    clipping, ``transformers.Trainer(optimizers=(opt, None))`` and accelerate work unchanged.

    Args:
        optimizer: the inner optimizer (AdamW, SGD, …).
        model: the model whose modules the subspace names (a peft model or a plain transformer).
        subspace: the initial subspace; may be ``None`` when ``refresh_fn`` is given (estimated at step 0).
        mode / project_on / conflict_scope / removal / change: see the module docstring.
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
        removal: Removal = "project",
        change: ProjectedChange = "step",
    ) -> None:
        for name, value, vocabulary in (
            ("mode", mode, ProjectMode),
            ("project_on", project_on, ProjectOn),
            ("conflict_scope", conflict_scope, ConflictScope),
            ("removal", removal, Removal),
            ("change", change, ProjectedChange),
        ):
            if value not in get_args(vocabulary):
                choices = " or ".join(repr(c) for c in get_args(vocabulary))
                raise ValueError(f"{name} must be {choices}, got {value!r}")
        if removal == "shrink" and project_on != "update":
            raise ValueError("removal='shrink' (the norm-matched control) needs project_on='update'")
        if change == "total" and (project_on != "update" or removal != "project"):
            raise ValueError("change='total' needs project_on='update' and removal='project'")
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
        self.removal: Removal = removal
        self.change: ProjectedChange = change
        self.anchor: Anchor | None = None  # change="total": the parameters the total change is measured from
        self.refresh_every = refresh_every
        self.refresh_fn = refresh_fn
        self.diagnostics = diagnostics
        self.num_steps = 0
        self.last_diagnostics: dict[str, float] = {}
        self.subspace: SafetySubspace | None = None
        # trainable parameters this optimizer steps that no subspace module covers (full fine-tuning:
        # embeddings, a tied LM head, norms, biases): they move unprojected — see set_subspace
        self.uncovered: list[str] = []
        self._warned_uncovered = False
        self._targets: list[LoraTarget | FullTarget] = []
        self._bases: dict[str, Bases] = {}
        self._groups: list[LoraGroup] = []  # update mode, LoRA
        self._full: list[FullProjector] = []  # both modes, full weights
        self._grad_projectors: dict[str, LoraGradProjector | FullProjector] = {}  # grad mode
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
            f"removal={self.removal}, change={self.change}, inner={self.optimizer.__class__.__name__})"
        )

    # ------------------------------------------------------------------ subspace
    def set_subspace(self, subspace: SafetySubspace) -> None:
        """Install a (new) subspace; bases are moved to each parameter's device once, in fp32.

        Under torch.distributed every rank adopts rank 0's subspace, so all replicas project alike.
        """
        subspace = broadcast_subspace(subspace)
        self.subspace = subspace
        self._targets = find_targets(self.model, subspace.modules)
        self._bases = {
            t.name: tuple(b.to(target_parameters(t)[0].device, torch.float32) for b in subspace.bases[t.name])
            for t in self._targets
        }
        shrink, total = self.removal == "shrink", self.change == "total"
        lora_cls = ShrinkLoraGroup if shrink else TotalLoraGroup if total else LoraGroup
        self._groups = group_lora(self._targets, self._bases, lora_cls)
        for g in self._groups:  # per-module bases become views of the stacked ones: one copy in memory
            for i, t in enumerate(g.targets):
                self._bases[t.name] = (g.u[i], g.s[i], g.v[i])
        full_cls = ShrinkFullProjector if shrink else TotalFullProjector if total else FullProjector
        self._full = [full_cls(t, *self._bases[t.name]) for t in self._targets if isinstance(t, FullTarget)]
        if total:
            if self.anchor is None:  # the first subspace: training starts here
                self.anchor = {t.name: tuple(p.detach().float().clone() for p in target_parameters(t))
                               for t in self._targets}  # fmt: skip
            for p in self._projectors():
                p.set_anchor(self.anchor)  # type: ignore[union-attr]
        self._grad_projectors = {p.target.name: p for p in self._full}
        for t in self._targets:
            if isinstance(t, LoraTarget):
                self._grad_projectors[t.name] = LoraGradProjector(t, *self._bases[t.name])
        self.uncovered = uncovered_parameters(
            self.model, self._targets, [p for group in self.param_groups for p in group["params"]]
        )
        if self.uncovered and not self._warned_uncovered:
            self._warned_uncovered = True
            logger.warning(
                "SPF projects %d target modules; %d trainable parameter(s) are not projected and move "
                "freely (e.g. %s) — freeze them, or accept that their updates are unprotected",
                len(self._targets),
                len(self.uncovered),
                ", ".join(self.uncovered[:5]) + (", …" if len(self.uncovered) > 5 else ""),
            )

    def anchor_state(self) -> dict[str, Tensor]:
        """The anchor of ``change="total"`` as flat tensors (``{module}.{i}``), for a checkpoint."""
        return {f"{name}.{i}": t for name, ts in (self.anchor or {}).items() for i, t in enumerate(ts)}

    def load_anchor(self, tensors: dict[str, Tensor]) -> None:
        """Restore :meth:`anchor_state`'s tensors (a resumed run measures its total change from where the
        interrupted one started)."""
        anchor: dict[str, list[Tensor]] = {}
        for key in sorted(tensors, key=lambda k: (k.rsplit(".", 1)[0], int(k.rsplit(".", 1)[1]))):
            anchor.setdefault(key.rsplit(".", 1)[0], []).append(tensors[key].float())
        self.anchor = {name: tuple(ts) for name, ts in anchor.items()}
        if self.subspace is not None:
            missing = [t.name for t in self._targets if t.name not in self.anchor]
            if missing:
                raise ValueError(f"load_anchor: no anchor for {missing[:3]} (of {len(missing)} modules)")
            self.set_subspace(self.subspace)

    def refresh_due(self) -> bool:
        """Whether the next :meth:`step` re-estimates (a fused estimate must capture in this step's pass)."""
        return self.refresh_fn is not None and (
            self.subspace is None
            or (self.refresh_every > 0 and self.num_steps > 0 and self.num_steps % self.refresh_every == 0)
        )

    def _maybe_refresh(self) -> dict[str, float]:
        if not self.refresh_due():
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

    def _decide_vec(self, inners: Tensor) -> Tensor:
        """Project which modules: all (``always``), those whose step raises the safety loss to first order
        (``conflict``, per module), or all-or-nothing on the whole model's sum (``conflict``, global)."""
        if self.mode == "always":
            return torch.ones(inners.shape, dtype=torch.bool, device=inners.device)
        if self.conflict_scope == "global":
            return (inners.sum() > 0).expand(inners.shape)
        return inners > 0

    # ------------------------------------------------------------------ the two projection routes
    def _projectors(self) -> list[LoraGroup | FullProjector]:
        return [*self._groups, *self._full]  # this order is the decision vector's

    def _snapshot(self) -> list[tuple[Tensor, ...]]:
        """Pre-step state: stacked (A, B) per LoRA group; the k×k core (+ a copy for diagnostics) per weight."""
        return [p.snapshot(self.diagnostics) for p in self._projectors()]

    def _project_updates(self, snaps: list[tuple[Tensor, ...]]) -> dict[str, float]:
        """Project θ_new − θ_old: pass 1 measures every module's change (and its ⟨G_k, ΔW⟩ when a decision or
        the diagnostics need it), the decision is taken on all of them at once, pass 2 applies it."""
        projectors = self._projectors()
        need_inner = self.mode == "conflict" or self.diagnostics
        work = [p.measure(snap, need_inner) for p, snap in zip(projectors, snaps, strict=True)]
        if need_inner:  # each projector's work ends with its modules' ⟨G_k, ΔW⟩
            inners = [w[-1] for w in work]
            decision = self._decide_vec(torch.cat(inners)) if inners else torch.zeros(0, dtype=torch.bool)
        else:
            decision = torch.ones(sum(p.size for p in projectors), dtype=torch.bool)
        stats = Stats() if self.diagnostics else None
        offset = 0
        for p, snap, w in zip(projectors, snaps, work, strict=True):
            p.apply(snap, w, decision[offset : offset + p.size], stats)
            offset += p.size
        return stats.summary() if stats is not None else {}

    def _project_grads(self) -> dict[str, float]:
        """Project gradients (before the inner step) of the targets that have them."""
        live = [self._grad_projectors[t.name] for t in self._targets if grads_present(t)]
        inners = {p.target.name: p.grad_inner() for p in live}
        decision = (
            dict(zip(inners, self._decide_vec(torch.stack(list(inners.values()))).tolist(), strict=True))
            if inners
            else {}
        )
        stats = Stats() if self.diagnostics else None
        for p in live:
            p.project_grad(decision[p.target.name], inners[p.target.name], stats)
        return stats.summary() if stats is not None else {}
