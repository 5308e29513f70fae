"""The projection: every piece of linear algebra that removes the safety component of an update.

Notation (docs/method.md): a linear module has effective weight ``W`` (m×n, ``y = x Wᵀ``). The safety
gradient ``G_s = ∂L_s/∂W`` has the truncated SVD ``G_k = U S Vᵀ`` with ``U`` m×k, ``S`` k, ``V`` n×k
(orthonormal columns). The two-sided projector is ``P(X) = U Uᵀ X V Vᵀ``; to first order an update
``ΔW`` changes the safety loss by ``⟨G_s, ΔW⟩_F`` and ``⟨G_k, ΔW⟩ = ⟨G_k, P(ΔW)⟩``, so removing ``P(ΔW)``
removes the whole first-order effect along the top-k directions.

For LoRA (``W = W₀ + s·B·A``, B m×r, A r×n) we never form m×n matrices: B's change is left-projected,
``ΔB ← (I − U Uᵀ) ΔB``, and A's change right-projected, ``ΔA ← ΔA (I − V Vᵀ)``. Then
``Uᵀ (B'A' − BA) V = Uᵀ(ΔB A + B ΔA + ΔB ΔA) V = 0`` *exactly* (not only to first order), because every
term has either ``Uᵀ ΔB = 0`` on the left or ``ΔA V = 0`` on the right.

All functions are pure and work in the dtype of the bases (fp32): callers cast. Every function also takes
a leading batch dimension (``G×m×k`` bases, ``G×m×r`` factors, …) and then returns one value per batch
entry: the optimizer projects all same-shaped LoRA modules (e.g. the 30 ``q_proj`` of a model) in one call.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "core_inner",
    "expand_core",
    "factored_inner",
    "factored_sq_norm",
    "lora_delta_factors",
    "lora_step_factors",
    "project_left",
    "project_right",
    "project_two_sided",
    "remove_left",
    "remove_right",
    "remove_two_sided",
    "safety_inner",
    "two_sided_core",
]


def project_two_sided(x: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``P(X) = U Uᵀ X V Vᵀ``: the part of ``X`` inside the two-sided safety subspace."""
    return u @ ((u.mT @ x) @ v) @ v.mT


def remove_two_sided(x: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``X − P(X)``: ``Uᵀ (X − P(X)) V = 0`` and the result is the closest such matrix to ``X``."""
    return x - project_two_sided(x, u, v)


def two_sided_core(x: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``Uᵀ X V`` (k×k): all of ``X`` the two-sided projection sees — for a full weight the optimizer keeps
    this core instead of a copy of the m×n matrix."""
    return (u.mT @ x) @ v


def expand_core(core: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``U C Vᵀ``: the m×n matrix of a k×k core; ``P(X) = expand_core(two_sided_core(X, U, V), U, V)``."""
    return (u @ core) @ v.mT


def core_inner(core: Tensor, s: Tensor) -> Tensor:
    """``⟨U diag(S) Vᵀ, X⟩_F = Σ_i S_i C_ii`` from the core ``C = Uᵀ X V``."""
    return (core.diagonal(dim1=-2, dim2=-1) * s).sum(-1)


def project_left(x: Tensor, u: Tensor) -> Tensor:
    """``U Uᵀ X`` (columns of X projected onto span U)."""
    return u @ (u.mT @ x)


def remove_left(x: Tensor, u: Tensor) -> Tensor:
    """``(I − U Uᵀ) X``; used for LoRA's B (m×r)."""
    return x - project_left(x, u)


def project_right(x: Tensor, v: Tensor) -> Tensor:
    """``X V Vᵀ`` (rows of X projected onto span V)."""
    return (x @ v) @ v.mT


def remove_right(x: Tensor, v: Tensor) -> Tensor:
    """``X (I − V Vᵀ)``; used for LoRA's A (r×n)."""
    return x - project_right(x, v)


def safety_inner(x: Tensor, u: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``⟨U diag(S) Vᵀ, X⟩_F = Σ_i S_i · u_iᵀ X v_i`` without forming the m×n gradient."""
    return ((u.mT @ x @ v).diagonal(dim1=-2, dim2=-1) * s).sum(-1)


# A matrix given as a product L @ R (m×q times q×n) with q ≪ m, n — the form every LoRA change takes.
def factored_inner(left: Tensor, right: Tensor, u: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``⟨U diag(S) Vᵀ, L R⟩_F`` in O((m+n)·q·k)."""
    return (((u.mT @ left) @ (right @ v)).diagonal(dim1=-2, dim2=-1) * s).sum(-1)


def factored_sq_norm(left: Tensor, right: Tensor) -> Tensor:
    """``‖L R‖_F² = tr((LᵀL)(R Rᵀ))`` in O((m+n)·q²)."""
    return ((left.mT @ left) * (right @ right.mT)).sum((-2, -1))


def lora_delta_factors(
    b_old: Tensor, a_old: Tensor, b_new: Tensor, a_new: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Factors ``(L, R)`` with ``L @ R = s·(B'A' − BA)``, the exact change of the effective weight."""
    left = torch.cat([b_new, -b_old], dim=-1) * scale
    right = torch.cat([a_new, a_old], dim=-2)
    return left, right


def lora_step_factors(b: Tensor, a: Tensor, g_b: Tensor, g_a: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Factors ``(L, R)`` with ``L @ R = s·(g_B A + B g_A)``: the first-order change of the effective weight
    along the gradients ``(g_B, g_A)`` (a step −η·g changes it by −η times this)."""
    return torch.cat([g_b, b], dim=-1) * scale, torch.cat([a, g_a], dim=-2)
