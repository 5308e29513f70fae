"""Safety subspace: per-module truncated SVD of the refusal-loss gradient w.r.t. each *effective* weight.

Why hooks instead of ``.grad`` (:mod:`spf.core.gradients` captures the factors ``G = Dᵀ X``):

* it works for a peft LoRA layer at initialisation (B = 0): the hook sits on the LoRA layer, whose output
  is ``x (W₀ + s·B·A)ᵀ``, so ``Dᵀ X`` is the gradient w.r.t. the effective weight, while ∂L/∂A = 0;
* no parameter ``.grad`` is touched, so a re-estimation in the middle of a training step (SPFOptimizer's
  refresh) cannot corrupt the task gradients;
* ``rank(G) ≤ T``: the exact SVD of ``G`` comes from T×T problems — O((m+n)·T²) per module, and no m×n
  gradient is ever formed (one module at a time when T is so large that the dense route is cheaper).

This module holds the subspace object and the estimators; it writes no folders (:mod:`spf.estimate`
publishes an estimate).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from spf.core.gradients import (
    SVDMethod,
    module_gradient_factors,
    topk_svds,
)
from spf.data.samples import ChatSample, DataError, collate, encode_sample, pad_token_id
from spf.io import save_json, save_tensors
from spf.models import default_target_modules, unwrap

logger = logging.getLogger(__name__)

__all__ = [
    "COMPLIANT_OPENING",
    "SVDMethod",
    "SafetySubspace",
    "SubspaceLoss",
    "estimate_batch_subspace",
    "estimate_from_samples",
    "estimate_safety_subspace",
    "margin_pair",
    "module_gradient_factors",
    "orthonormality_error",
    "subspace_overlap",
]

FORMAT_VERSION = 1
_topk_svds = topk_svds  # its name before spf.core.gradients: experiments/margin_vs_ce.py imports it from here
# what the subspace protects: ce = the refusal's cross-entropy; margin = CE(refusal) − CE(compliant opening)
SubspaceLoss = Literal["ce", "margin"]


@dataclass
class SafetySubspace:
    """Per-module top-k singular triplets of the safety gradient.

    ``bases[name] = (U, S, V)`` with U: m×k, S: k, V: n×k (fp32, orthonormal columns); ``energy[name]``
    is ‖G‖_F² (all singular values), ``spectra[name]`` the leading singular values (≥ k of them when the
    gradient has that rank), so ``cer(k)`` is exact for every k ≤ len(spectrum). ``rank`` is the rank
    asked for; a module's k (:attr:`effective_rank`) is smaller when its gradient has fewer directions
    above the numerical noise floor (a sample of T tokens has at most T; see :mod:`spf.core.gradients`).
    """

    bases: dict[str, tuple[Tensor, Tensor, Tensor]]
    energy: dict[str, float]
    spectra: dict[str, Tensor]
    rank: int
    metadata: dict = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return list(self.bases)

    @property
    def effective_rank(self) -> dict[str, int]:
        """Per module the number of directions actually held (≤ ``rank``), read from the bases themselves
        so it is right for any subspace (estimated, loaded, truncated, built by hand)."""
        return {name: int(u.shape[1]) for name, (u, _, _) in self.bases.items()}

    def cer(self, k: int) -> dict[str, float]:
        """Cumulative explained ratio Σ_{i≤k} σᵢ² / Σᵢ σᵢ² per module."""
        out = {}
        for name, spec in self.spectra.items():
            total = self.energy[name]
            out[name] = float((spec[:k].double() ** 2).sum() / total) if total > 0 else 0.0
        return out

    def mean_cer(self, k: int) -> float:
        values = list(self.cer(k).values())
        return sum(values) / max(len(values), 1)

    def truncate(self, k: int) -> SafetySubspace:
        """The top-``min(k, rank)`` directions (spectra and energy unchanged, so CER stays exact)."""
        bases = {n: (u[:, :k], s[:k], v[:, :k]) for n, (u, s, v) in self.bases.items()}
        out = SafetySubspace(
            bases, dict(self.energy), dict(self.spectra), min(k, self.rank), dict(self.metadata)
        )
        if "effective_rank" in out.metadata:
            out.metadata["effective_rank"] = out.effective_rank
        return out

    def to(self, device: torch.device | str) -> SafetySubspace:
        bases = {n: tuple(t.to(device) for t in b) for n, b in self.bases.items()}
        return SafetySubspace(bases, dict(self.energy), dict(self.spectra), self.rank, dict(self.metadata))  # type: ignore[arg-type]

    def save(self, directory: str | Path) -> None:
        """``subspace.safetensors`` (U, S, V, spectrum per module) + ``subspace.json`` (metadata)."""
        directory = Path(directory)
        tensors: dict[str, Tensor] = {}
        for name, (u, s, v) in self.bases.items():
            tensors[f"{name}.U"] = u
            tensors[f"{name}.S"] = s
            tensors[f"{name}.V"] = v
            tensors[f"{name}.spectrum"] = self.spectra[name]
        save_tensors(tensors, directory / "subspace.safetensors", metadata={"format": "spf-subspace"})
        meta = {
            "format_version": FORMAT_VERSION,
            "rank": self.rank,
            "modules": self.modules,
            "energy": self.energy,
            "mean_cer": {str(k): self.mean_cer(k) for k in (1, 5, 10, 20)},
            **self.metadata,
            "effective_rank": self.effective_rank,  # from the bases written beside it, never stale
        }
        save_json(meta, directory / "subspace.json")

    @classmethod
    def load(cls, directory: str | Path) -> SafetySubspace:
        directory = Path(directory)
        meta_path, tensor_path = directory / "subspace.json", directory / "subspace.safetensors"
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p}: not found — is '{directory}' a folder written by `spf estimate`?"
                )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{meta_path}: field 'format_version': unsupported {meta.get('format_version')!r}"
            )
        tensors = load_file(str(tensor_path))
        bases, spectra = {}, {}
        for name in meta["modules"]:
            try:
                bases[name] = (tensors[f"{name}.U"], tensors[f"{name}.S"], tensors[f"{name}.V"])
                spectra[name] = tensors[f"{name}.spectrum"]
            except KeyError as e:
                raise DataError(f"{tensor_path}: missing tensor {e} for module '{name}'") from None
        energy = {k: float(v) for k, v in meta.pop("energy").items()}
        rank = int(meta.pop("rank"))
        for key in ("format_version", "modules", "mean_cer"):
            meta.pop(key, None)
        return cls(bases, energy, spectra, rank, meta)


def subspace_overlap(a: SafetySubspace, b: SafetySubspace, k: int | None = None) -> dict[str, float]:
    """Frobenius overlap φ = (‖U_aᵀU_b‖²_F / k + ‖V_aᵀV_b‖²_F / k) / 2 per shared module, in [0, 1]."""
    out = {}
    for name in a.bases.keys() & b.bases.keys():
        ua, _, va = a.bases[name]
        ub, _, vb = b.bases[name]
        kk = min(k or ua.shape[1], ua.shape[1], ub.shape[1])
        if kk == 0:
            continue
        ua, va, ub, vb = ua[:, :kk], va[:, :kk], ub[:, :kk].to(ua), vb[:, :kk].to(ua)
        out[name] = float(((ua.T @ ub).pow(2).sum() + (va.T @ vb).pow(2).sum()) / (2 * kk))
    return out


# ------------------------------------------------------------------------------------------- estimation


def estimate_safety_subspace(
    model: nn.Module, tokenizer, sample: ChatSample, **kwargs: Any
) -> SafetySubspace:
    """Subspace of ONE (harmful prompt, refusal) sample — the paper's estimator: :func:`estimate_batch_subspace`
    of ``[sample]``, with the same keywords (``rank``, ``modules``, ``max_length``, ``spectrum_size``,
    ``svd``, ``model_ref``)."""
    return estimate_batch_subspace(model, tokenizer, [sample], **kwargs)


def estimate_batch_subspace(
    model: nn.Module,
    tokenizer,
    samples: Sequence[ChatSample],
    *,
    rank: int,
    modules: Sequence[str] | None = None,
    max_length: int = 512,
    spectrum_size: int = 64,
    svd: SVDMethod = "auto",
    model_ref: str | None = None,
    weights: Sequence[float] | None = None,
) -> SafetySubspace:
    """Gradient of the mean (over samples) refusal cross-entropy; per-module truncated SVD of rank ``rank``.

    Needs every sample to carry a response (the refusal). ``weights`` (one per sample, default all 1)
    turn the mean into a weighted sum / n: ``[1, -1]`` on (prompt, refusal) and (prompt, compliance)
    gives the gradient of the margin CE(refusal) − CE(compliance) (see :func:`margin_pair`). The model is put in eval mode (no dropout)
    for the pass and restored afterwards; parameter ``.grad`` fields are left untouched.
    """
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    if not samples:
        raise ValueError("no samples to estimate the safety subspace from")
    if weights is not None and len(weights) != len(samples):
        raise ValueError(f"weights: expected {len(samples)} values (one per sample), got {len(weights)}")
    t0 = time.perf_counter()
    base = unwrap(model)
    names = list(modules) if modules is not None else default_target_modules(model)
    lookup = dict(base.named_modules())
    missing = [n for n in names if n not in lookup]
    if missing:
        raise ValueError(f"modules not found in the model: {missing[:5]}{' …' if len(missing) > 5 else ''}")

    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    batch = collate([encode_sample(tokenizer, s, max_length=max_length) for s in samples], pad)
    batch = {k: v.to(device) for k, v in batch.items()}
    ds, xs, loss = module_gradient_factors(model, batch, names, weights=weights)
    n_tokens = int(batch["attention_mask"].sum())
    bases, energy, spectra = {}, {}, {}
    for name, top in zip(names, topk_svds(ds, xs, rank, spectrum_size, svd), strict=True):
        energy[name] = top.energy
        spectra[name] = top.s[:spectrum_size].float().cpu()
        k = top.u.shape[1]  # ≤ rank: directions under the noise floor are dropped
        bases[name] = (top.u, top.s[:k].float().clone(), top.v)

    digest = hashlib.sha256("".join(s.sha256() for s in samples).encode()).hexdigest()
    meta = {
        "model_ref": model_ref,
        "sample_hash": digest,
        "n_samples": len(samples),
        "n_tokens": n_tokens,
        "n_factor_rows": int(ds[0].shape[0]) if ds else 0,  # < n_tokens when rows share a prefix
        "safety_loss": float(loss.detach()),
        "estimator": "single" if len(samples) == 1 else "batch",
        **({"weights": [float(w) for w in weights]} if weights is not None else {}),
        "seconds": round(time.perf_counter() - t0, 4),
    }
    sub = SafetySubspace(bases, energy, spectra, rank, meta)
    sub.metadata["effective_rank"] = sub.effective_rank
    sub.metadata["orthonormality_error"] = orthonormality_error(sub)
    eff = sub.effective_rank.values()
    logger.info(
        "estimated safety subspace: %d modules, rank %d (effective %d..%d), %d tokens, "
        "max|UᵀU−I| %.1e, max|VᵀV−I| %.1e",
        len(bases),
        rank,
        min(eff, default=0),
        max(eff, default=0),
        n_tokens,
        sub.metadata["orthonormality_error"]["u"],
        sub.metadata["orthonormality_error"]["v"],
    )
    return sub


def orthonormality_error(sub: SafetySubspace) -> dict[str, float]:
    """``{"u": max|UᵀU − I|, "v": max|VᵀV − I|}`` over all modules: 0 up to fp32 rounding for a sound basis.
    A diagnostic the estimator records, since a non-orthonormal basis makes ``I − UUᵀ`` lengthen updates."""
    worst = {"u": 0.0, "v": 0.0}
    for u, _, v in sub.bases.values():
        for key, a in (("u", u), ("v", v)):
            if a.shape[1]:
                gram = a.double().T @ a.double()
                err = (gram - torch.eye(a.shape[1], dtype=gram.dtype, device=gram.device)).abs().max()
                worst[key] = max(worst[key], float(err))
    return worst


def estimate_from_samples(
    model: nn.Module,
    tokenizer,
    samples: Sequence[ChatSample],
    *,
    rank: int,
    loss: SubspaceLoss = "ce",
    modules: Sequence[str] | None = None,
    max_length: int = 512,
    model_ref: str | None = None,
) -> tuple[SafetySubspace, list[ChatSample]]:
    """The estimate ``spf estimate``, the pipeline's estimate stage and ``spf bench`` share.

    ``loss="ce"``: the refusal cross-entropy of the sample(s) (one sample = the paper's single-sample
    method). ``loss="margin"``: each sample becomes the pair of :func:`margin_pair`, weights ``[1, −1]``.
    Returns the subspace and the samples it was estimated from (what ``sample.jsonl`` must hold: training
    re-estimates from them, with the weights the subspace's metadata records).
    """
    if loss not in get_args(SubspaceLoss):
        raise ValueError(f"loss must be one of {get_args(SubspaceLoss)}, got {loss!r}")
    if not samples:
        raise ValueError("no samples to estimate the safety subspace from")
    kwargs = {"rank": rank, "modules": modules, "max_length": max_length, "model_ref": model_ref}
    if loss == "margin":
        pairs = [margin_pair(s) for s in samples]
        used = [x for pair, _ in pairs for x in pair]
        weights = [w for _, ws in pairs for w in ws]
        sub = estimate_batch_subspace(model, tokenizer, used, weights=weights, **kwargs)
    else:
        used = list(samples)
        sub = estimate_batch_subspace(model, tokenizer, used, **kwargs)
    sub.metadata["estimator"] = "single" if len(samples) == 1 else "batch"
    sub.metadata["loss"] = loss
    return sub, used


COMPLIANT_OPENING = "Sure, here is a step-by-step guide:\n\nStep 1:"


def margin_pair(
    sample: ChatSample, compliance: str = COMPLIANT_OPENING
) -> tuple[list[ChatSample], list[float]]:
    """Samples and weights whose gradient is that of the margin CE(refusal) − CE(compliant opening).

    Plain CE protects "keep saying this refusal"; the margin protects "prefer refusing to complying" — the
    compliant side is what a harmful fine-tune pushes up (AdvBench-style "Sure, here is …" targets).
    """
    if sample.response is None:
        raise ValueError("margin_pair needs a sample with its refusal as the response")
    return [sample, sample.with_response(compliance)], [1.0, -1.0]
