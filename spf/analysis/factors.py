"""Per-sample gradient factors and the algebra on them, none of which forms an m×n gradient unless it must.

One sample's gradient of a linear layer is ``G = Dᵀ X`` over its T tokens (D: T×m output gradients, X: T×n
inputs), captured by :func:`spf.core.subspace.module_gradient_factors` — the estimator's own capture, so
what is analysed is exactly what SPF projects against. Inner products and norms come from the T×T Gram
matrices; batch gradients (:class:`Accumulator`) are summed densely.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from spf.core.gradients import module_gradient_factors, thin_svd_of_outer
from spf.core.subspace import SafetySubspace
from spf.data.samples import IGNORE_INDEX
from spf.models import unwrap

__all__ = [
    "Accumulator",
    "Factors",
    "cer_curve",
    "cosine",
    "factor_cosines",
    "factor_svd",
    "gradient_factors",
    "layer_of",
    "module_type",
    "subspace_from_svds",
]

_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


# ------------------------------------------------------------------------------------------- module names


def layer_of(name: str) -> int | None:
    """Decoder layer index of a module name (``model.layers.12.mlp.up_proj`` → 12), None if it has none."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """Last component of a module name (``q_proj``, ``down_proj``, …)."""
    return name.rsplit(".", 1)[-1]


# ---------------------------------------------------------------------------------------- gradient factors


@dataclass
class Factors:
    """Per-module factors of one sample's weight gradient ``G = Dᵀ X`` (D: T×m, X: T×n) and its token counts."""

    d: dict[str, Tensor]
    x: dict[str, Tensor]
    n_tokens: int
    n_supervised: int
    loss: float

    def dense(self, name: str) -> Tensor:
        return self.d[name].T @ self.x[name]


def gradient_factors(model: nn.Module, encoded: dict[str, list[int]], modules: Sequence[str]) -> Factors:
    """Factors of the gradient of one encoded sample's mean response-token cross-entropy.

    ``encoded`` is what :func:`spf.data.samples.encode_sample` returns (possibly truncated). The capture is
    :func:`spf.core.subspace.module_gradient_factors` (the subspace estimator's), so what is analysed here is
    exactly what SPF projects against; factors come back in fp32.
    """
    lookup = dict(unwrap(model).named_modules())
    missing = [n for n in modules if n not in lookup]
    if missing:
        raise ValueError(f"modules not found in the model: {missing[:5]}")
    device = next(model.parameters()).device
    input_ids = torch.tensor([encoded["input_ids"]], device=device)
    labels = torch.tensor([encoded["labels"]], device=device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    n_supervised = int((labels[0, 1:] != IGNORE_INDEX).sum())
    if n_supervised == 0:
        raise ValueError("sample has no supervised (response) token")
    d_list, x_list, loss = module_gradient_factors(model, batch, modules)
    ds = {name: d.float() for name, d in zip(modules, d_list, strict=True)}
    xs = {name: x.float() for name, x in zip(modules, x_list, strict=True)}
    return Factors(ds, xs, int(input_ids.shape[1]), n_supervised, float(loss))


# the one exact thin SVD of ``Dᵀ X`` (QR of the factors, fp64 core), shared with the subspace estimator
factor_svd = thin_svd_of_outer


def cer_curve(singular_values: Tensor, max_k: int, energy: float | None = None) -> list[float]:
    """``[CER(1), …, CER(max_k)]`` with ``CER(k) = Σ_{i≤k} σᵢ² / energy`` (energy default Σ all σᵢ²).

    ``singular_values`` must hold all non-zero singular values (or ``energy`` be given); k beyond the rank
    gives 1. A zero gradient gives 0 everywhere.
    """
    if max_k < 1:
        raise ValueError(f"max_k must be ≥ 1, got {max_k}")
    sq = singular_values.double().flatten() ** 2
    total = float(sq.sum()) if energy is None else float(energy)
    if total <= 0:
        return [0.0] * max_k
    cum = (torch.cumsum(sq, 0) / total).clamp(max=1.0).tolist()
    if energy is None and cum:
        cum[-1] = 1.0  # all singular values present: exactly 1 at the rank, whatever the rounding
    last = cum[-1] if cum else 0.0
    return [float(cum[k]) if k < len(cum) else (1.0 if energy is None else last) for k in range(max_k)]


def factor_cosines(a: Factors, b: Factors) -> dict[str, tuple[float, float, float]]:
    """Per module ``(⟨G_a, G_b⟩_F, ‖G_a‖²_F, ‖G_b‖²_F)`` from Gram matrices: ``⟨DₐᵀXₐ, D_bᵀX_b⟩ =
    Σ (Dₐ D_bᵀ) ⊙ (Xₐ X_bᵀ)`` — O(Tₐ·T_b·(m+n)), no m×n gradient formed."""
    out = {}
    for name in a.d.keys() & b.d.keys():
        da, xa, db, xb = a.d[name], a.x[name], b.d[name], b.x[name]
        inner = float(((da @ db.T).double() * (xa @ xb.T).double()).sum())
        out[name] = (inner, _gram_energy(da, xa), _gram_energy(db, xb))
    return out


def _gram_energy(d: Tensor, x: Tensor) -> float:
    """‖DᵀX‖²_F = Σ (D Dᵀ) ⊙ (X Xᵀ)."""
    return float(((d @ d.T).double() * (x @ x.T).double()).sum())


def cosine(pairs: Iterable[tuple[float, float, float]]) -> float:
    inner = na = nb = 0.0
    for i, a, b in pairs:
        inner, na, nb = inner + i, na + a, nb + b
    return inner / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0


# ----------------------------------------------------------------------------------------- batch gradients


class Accumulator:
    """Dense running sum of per-sample weight gradients (a batch gradient = the mean over its samples)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.tokens = 0
        self.supervised = 0

    def add(self, f: Factors) -> None:
        for name, d in f.d.items():
            if name in self.sums:
                self.sums[name].addmm_(d.T, f.x[name])
            else:
                self.sums[name] = d.T @ f.x[name]
        self.count += 1
        self.tokens += f.n_tokens
        self.supervised += f.n_supervised

    def svds(self, vectors: bool = True) -> dict[str, tuple[Tensor | None, Tensor, Tensor | None]]:
        """Per module the full SVD of the mean gradient (U, S, V), or (None, S, None) without vectors."""
        out: dict[str, tuple[Tensor | None, Tensor, Tensor | None]] = {}
        for name, g in self.sums.items():
            if vectors:
                u, s, vh = torch.linalg.svd(g / self.count, full_matrices=False)
                out[name] = (u, s.double(), vh.T)
            else:
                out[name] = (None, torch.linalg.svdvals(g / self.count).double(), None)
        return out


def subspace_from_svds(
    svds: dict[str, tuple[Tensor, Tensor, Tensor]], rank: int, spectrum: int
) -> SafetySubspace:
    """The rank-``rank`` subspace of per-module SVDs ``(U, S, V)`` that hold *every* non-zero singular value,
    so the recorded energy ``Σ σᵢ²`` (and with it every CER) is exact; ``spectrum`` leading values are kept."""
    bases, energy, spectra = {}, {}, {}
    for name, (u, s, v) in svds.items():
        k = min(rank, s.numel())
        bases[name] = (u[:, :k].float().contiguous(), s[:k].float(), v[:, :k].float().contiguous())
        energy[name] = float((s.double() ** 2).sum())
        spectra[name] = s[:spectrum].float()
    return SafetySubspace(bases, energy, spectra, rank)
