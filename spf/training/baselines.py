"""Baseline defenses against the safety loss of fine-tuning, run by the same loop as vanilla LoRA and SPF.

Pure helpers only (no model, no I/O); the method classes of ``spf.training.methods`` wire them in. See docs/baselines.md.

* **SafeInstr** (Bianchi et al., ICLR 2024): mix a few safety demonstrations into the task data —
  :func:`mix_safety_demos`.
* **SafeGrad-style gradient surgery** (PCGrad, Yu et al., NeurIPS 2020, applied to a safety loss): remove
  from the task gradient its component against the safety gradient when the two conflict —
  :func:`pcgrad_project`, :func:`safety_batch_indices`.
  Its safety loss is the refusals' cross-entropy (``safegrad_loss: ce``) or, as SafeGrad has it, the KL
  divergence of the model's next-token distributions from the aligned model's on them — :func:`response_kl`;
  its projection acts on the gradient or on the optimizer's update (Adam-correct, ``safegrad_project_on``).
* **Lisa** (Huang et al., NeurIPS 2024): alternate alignment steps and task steps, each state pulled towards
  where the other one left the weights — :func:`lisa_state`, :func:`lisa_steps_before`,
  :func:`lisa_last_switch`, :func:`add_proximal_grad`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, TypeVar

import torch
from torch import Tensor

__all__ = [
    "LisaState",
    "add_proximal_grad",
    "lisa_last_switch",
    "lisa_state",
    "lisa_steps_before",
    "mix_safety_demos",
    "pcgrad_project",
    "response_kl",
    "safeinstr_count",
    "safety_batch_indices",
]

T = TypeVar("T")
LisaState = Literal["align", "task"]

# Seeds of the generators below are derived from the run seed so they never coincide with the task stream's
# (spf.training.streams.index_batches uses seed * 1_000_003 + epoch).
_MIX_SALT = 0x5AFE_1257
_PICK_SALT = 0x5AFE_6AAD


def _cycled_permutations(n: int, k: int, gen: torch.Generator) -> list[int]:
    """``k`` indices of ``range(n)``: a random permutation, then more permutations if ``k > n`` — without
    replacement while possible, and balanced (each index used ⌊k/n⌋ or ⌈k/n⌉ times) beyond that."""
    out: list[int] = []
    while len(out) < k:
        out.extend(torch.randperm(n, generator=gen).tolist())
    return out[:k]


def response_kl(logits: Tensor, ref_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over rows of the mean over a row's ``mask``ed positions of KL(p_ref ‖ p_θ) between the softmaxes
    of ``ref_logits`` (the aligned model, no gradient) and ``logits`` ([B, P, V] both; ``mask`` [B, P]).
    Zero exactly when the model predicts what the aligned one does at every response position."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)  # [B, P]
    m = mask.float()
    return ((kl * m).sum(1) / m.sum(1).clamp_min(1.0)).mean()


# --------------------------------------------------------------------------------------------- SafeInstr


def safeinstr_count(n_task: int, fraction: float) -> int:
    """Demos to add: ``round(fraction · n_task)`` (half up), at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"safeinstr fraction must be in (0, 1], got {fraction}")
    return max(1, math.floor(fraction * n_task + 0.5))


def mix_safety_demos(
    task: Sequence[T], safety: Sequence[T], fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """SafeInstr: ``(task + added, added)`` with ``added`` = :func:`safeinstr_count` safety demos.

    Picked deterministically from ``seed``, without replacement when the safety set is large enough (else
    every demo is used before any repeats). The demos are appended; the training loop reshuffles every epoch,
    so where they sit does not matter, and the task samples keep their positions (the fixed task-loss slice
    ``data[:task_eval_n]`` stays task data).
    """
    if not safety:
        raise ValueError("safeinstr needs at least one safety demonstration")
    n = safeinstr_count(len(task), fraction)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + _MIX_SALT)
    added = [safety[i] for i in _cycled_permutations(len(safety), n, gen)]
    return [*task, *added], added


# ---------------------------------------------------------------------------------------------- SafeGrad


def safety_batch_indices(n: int, batch: int, seed: int, step: int) -> list[int]:
    """The safety pairs whose gradient step ``step`` uses: a function of (seed, step) only, so resumable."""
    if n < 1 or batch < 1:
        raise ValueError(f"need n ≥ 1 and batch ≥ 1, got n={n}, batch={batch}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + _PICK_SALT + 7_919 * step)
    return _cycled_permutations(n, batch, gen)


@torch.no_grad()
def pcgrad_project(
    task_grads: Sequence[Tensor],
    safety_grads: Sequence[Tensor],
    scope: Literal["global", "module"] = "global",
    eps: float = 1e-30,
) -> dict[str, float]:
    """PCGrad against a safety gradient, **in place** on ``task_grads``.

    The optimizer moves along ``-g``; to first order the safety loss rises when ``<g, g_s> < 0``. Then the
    conflicting component is removed: ``g ← g − (<g, g_s> / ||g_s||²) g_s``, after which ``<g, g_s> = 0``.
    A non-conflicting ``g`` is left bit-for-bit unchanged.

    ``scope="global"`` takes one dot product over all tensors flattened together (default);
    ``"module"`` tests and projects every tensor pair on its own (so each ``<g_i, g_s,i> ≥ 0`` afterwards,
    and hence the global one too). Products are accumulated in float32 whatever the gradient dtype.

    Returns diagnostics: ``cos`` and ``cos_after`` (global cosine of g and g_s before/after), ``projected``
    (1/0 for global; the fraction of tensors projected for module), ``removed_frac`` (norm of the removed
    component relative to ``||g||``), ``dot`` (the global ``<g, g_s>`` before).
    """
    if len(task_grads) != len(safety_grads):
        raise ValueError(f"{len(task_grads)} task gradients but {len(safety_grads)} safety gradients")
    if scope not in ("global", "module"):
        raise ValueError(f"scope must be 'global' or 'module', got {scope!r}")
    if not task_grads:
        return {"cos": 0.0, "cos_after": 0.0, "projected": 0.0, "removed_frac": 0.0, "dot": 0.0}
    for i, (g, s) in enumerate(zip(task_grads, safety_grads, strict=True)):
        if g.shape != s.shape:
            raise ValueError(f"tensor {i}: task gradient {tuple(g.shape)} vs safety {tuple(s.shape)}")
    dev = task_grads[0].device

    def dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        return torch.stack([(x.float() * y.float()).sum().to(dev) for x, y in zip(a, b, strict=True)])

    gs = dots(task_grads, safety_grads)
    ss = dots(safety_grads, safety_grads)
    gg = dots(task_grads, task_grads)
    if scope == "global":
        dot, sn = gs.sum(), ss.sum()
        coef = torch.where((dot < 0) & (sn > eps), dot / sn.clamp_min(eps), torch.zeros_like(dot))
        coefs = coef.expand_as(gs)
    else:
        coefs = torch.where((gs < 0) & (ss > eps), gs / ss.clamp_min(eps), torch.zeros_like(gs))
    coef_list = coefs.tolist()  # one host sync
    for g, s, c in zip(task_grads, safety_grads, coef_list, strict=True):
        if c != 0.0:
            g.sub_((s.float() * c).to(g.dtype))
    removed_sq = (coefs.square() * ss).sum()  # the removed components are c_i·s_i, disjoint across tensors
    gs_after = dots(task_grads, safety_grads).sum()
    gg_after = dots(task_grads, task_grads).sum()
    g_norm, s_norm = gg.sum().sqrt(), ss.sum().sqrt()
    denom = (g_norm * s_norm).clamp_min(eps)
    cos, cos_after = gs.sum() / denom, gs_after / (gg_after.sqrt() * s_norm).clamp_min(eps)
    n_proj = sum(c != 0.0 for c in coef_list)
    projected = float(n_proj > 0) if scope == "global" else n_proj / len(coef_list)
    vals = torch.stack([cos, cos_after, removed_sq.sqrt() / g_norm.clamp_min(eps), gs.sum()]).tolist()
    return {
        "cos": vals[0],
        "cos_after": vals[1],
        "projected": projected,
        "removed_frac": vals[2],
        "dot": vals[3],
    }


# -------------------------------------------------------------------------------------------------- Lisa


def _check_lisa(align_steps: int, task_steps: int) -> None:
    if align_steps < 1 or task_steps < 1:
        raise ValueError(f"lisa needs align_steps ≥ 1 and task_steps ≥ 1, got {align_steps}, {task_steps}")


def lisa_state(step: int, align_steps: int, task_steps: int) -> LisaState:
    """State of 0-based optimizer step ``step``: each cycle is ``align_steps`` alignment steps (on the safety
    data), then ``task_steps`` fine-tuning steps — alignment first, as in the authors' trainer."""
    _check_lisa(align_steps, task_steps)
    return "align" if step % (align_steps + task_steps) < align_steps else "task"


def lisa_steps_before(step: int, align_steps: int, task_steps: int) -> tuple[int, int]:
    """(alignment steps, task steps) among steps ``0 … step-1``: where each data stream resumes."""
    _check_lisa(align_steps, task_steps)
    cycles, rem = divmod(step, align_steps + task_steps)
    n_align = cycles * align_steps + min(rem, align_steps)
    return n_align, step - n_align


def lisa_last_switch(step: int, align_steps: int, task_steps: int) -> int:
    """First step of the run of same-state steps that ``step`` belongs to (0 for the first run): the proximal
    anchor of step ``step`` is the weights just before that step."""
    _check_lisa(align_steps, task_steps)
    pos = step % (align_steps + task_steps)
    return step - pos if pos < align_steps else step - (pos - align_steps)


@torch.no_grad()
def add_proximal_grad(params: Sequence[Tensor], anchor: Sequence[Tensor], rho: float) -> float:
    """Add the gradient of ``(rho/2)·Σ||w − w_anchor||²``, i.e. ``rho·(w − w_anchor)``, to each ``.grad``
    (created when missing); return the term's value at the current weights."""
    if len(params) != len(anchor):
        raise ValueError(f"{len(params)} parameters but {len(anchor)} anchor tensors")
    if not params:
        return 0.0
    sq = []
    for p, a in zip(params, anchor, strict=True):
        diff = p.detach().float() - a.float()
        sq.append(diff.square().sum())
        if rho:
            step = (diff * rho).to(p.dtype)
            if p.grad is None:
                p.grad = step
            else:
                p.grad.add_(step)
    return 0.5 * rho * float(torch.stack([x.to(sq[0].device) for x in sq]).sum())
