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
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from spf.core.gradients import (
    SVDMethod,
    module_gradient_factors,
    topk_svds,
)
from spf.data.samples import ChatSample, DataError, collate, encode_sample, pad_token_id
from spf.io import file_sha256, save_json, save_tensors
from spf.loaders import ConfigFileError, load_json_text
from spf.models import default_target_modules, model_fingerprint, unwrap

logger = logging.getLogger(__name__)

__all__ = [
    "COMPLIANT_OPENING",
    "SVDMethod",
    "SafetySubspace",
    "SubspaceLoss",
    "check_rank_available",
    "estimate_batch_subspace",
    "estimate_from_samples",
    "estimate_safety_subspace",
    "margin_pair",
    "module_gradient_factors",
    "module_shapes",
    "orthonormality_error",
    "random_like",
    "subspace_from_factors",
    "subspace_overlap",
    "weights_fingerprint",
]

# 2: subspace.json records the tensor file's sha256, each module's weight shape and the model's fingerprint
FORMAT_VERSION = 2
ORTHONORMALITY_TOL = 1e-3  # max|UᵀU − I| a loaded basis may have: fp32 rounding is ~1e-6, a scaled basis ≫ 1
# written by save() from the bases themselves; never carried over from a loaded subspace's metadata
_STRUCTURAL = ("format_version", "rank", "modules", "energy", "mean_cer", "shapes", "tensor_sha256")
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
        """``subspace.safetensors`` (U, S, V, spectrum per module) + ``subspace.json`` (metadata, with the
        tensor file's sha256 and each module's weight shape ``[m, n]``, which :meth:`load` verifies)."""
        directory = Path(directory)
        tensors: dict[str, Tensor] = {}
        for name, (u, s, v) in self.bases.items():
            tensors[f"{name}.U"] = u
            tensors[f"{name}.S"] = s
            tensors[f"{name}.V"] = v
            tensors[f"{name}.spectrum"] = self.spectra[name]
        tensor_path = directory / "subspace.safetensors"
        save_tensors(tensors, tensor_path, metadata={"format": "spf-subspace"})
        meta = {
            "format_version": FORMAT_VERSION,
            "rank": self.rank,
            "modules": self.modules,
            "energy": self.energy,
            "mean_cer": {str(k): self.mean_cer(k) for k in (1, 5, 10, 20)},
            **{k: v for k, v in self.metadata.items() if k not in _STRUCTURAL},
            "effective_rank": self.effective_rank,  # from the bases written beside it, never stale
            "shapes": {n: [int(u.shape[0]), int(v.shape[0])] for n, (u, _, v) in self.bases.items()},
            "tensor_sha256": file_sha256(tensor_path),
        }
        save_json(meta, directory / "subspace.json")

    @classmethod
    def load(cls, directory: str | Path) -> SafetySubspace:
        """A folder :meth:`save` wrote, verified: DataError naming the file and the problem when
        ``subspace.json`` is not the expected object, the tensor file's hash differs from the recorded one,
        a tensor is missing, extra, of the wrong shape or not finite, or a basis is not orthonormal."""
        directory = Path(directory)
        meta_path, tensor_path = directory / "subspace.json", directory / "subspace.safetensors"
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p}: not found — is '{directory}' a folder written by `spf estimate`?"
                )
        meta = _read_meta(meta_path)
        digest = file_sha256(tensor_path)
        if digest != meta["tensor_sha256"]:
            raise DataError(
                f"{tensor_path}: sha256 {digest[:12]}… differs from tensor_sha256 {meta['tensor_sha256'][:12]}… "
                "recorded in subspace.json: the file changed after it was written; re-run `spf estimate`"
            )
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(f"{tensor_path}: not readable safetensors ({exc})") from None
        bases, spectra = _check_tensors(tensor_path, meta, tensors)
        energy = {k: float(v) for k, v in meta["energy"].items()}
        sub = cls(
            bases, energy, spectra, int(meta["rank"]), {k: v for k, v in meta.items() if k not in _STRUCTURAL}
        )
        for name, (u, _, v) in bases.items():
            err = max(_gram_error(u), _gram_error(v))
            if err > ORTHONORMALITY_TOL:
                raise DataError(
                    f"{tensor_path}: module '{name}': basis not orthonormal (max|UᵀU−I|, |VᵀV−I| = {err:.3g} "
                    f"> {ORTHONORMALITY_TOL:g}); projecting with it would distort updates"
                )
        return sub


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "rank": (int,), "modules": (list,), "energy": (dict,), "shapes": (dict,), "tensor_sha256": (str,),
    "effective_rank": (dict,), "model_fingerprint": (str, type(None)), "weights_fingerprint": (str, type(None)),
    "weights": (list, type(None)), "model_ref": (str, type(None)),
}  # fmt: skip
_REQUIRED = ("rank", "modules", "energy", "shapes", "tensor_sha256")


def _read_meta(path: Path) -> dict[str, Any]:
    """``subspace.json``, strict JSON, with the fields :meth:`SafetySubspace.load` relies on checked."""
    try:
        meta = load_json_text(path.read_text(encoding="utf-8"), str(path))
    except ConfigFileError as exc:
        raise DataError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if version == 1 and not isinstance(version, bool):
        raise DataError(
            f"{path}: format_version 1, written by an older spf without a content hash or model fingerprint; "
            "re-run `spf estimate` to rebuild this folder"
        )
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise DataError(
            f"{path}: field 'format_version': unsupported {version!r:.40} (expected {FORMAT_VERSION})"
        )
    for key in _REQUIRED:
        if key not in meta:
            raise DataError(f"{path}: field '{key}' missing")
    for key, types in _FIELD_TYPES.items():
        if key in meta and (not isinstance(meta[key], types) or isinstance(meta[key], bool)):
            raise DataError(f"{path}: field '{key}': expected {' or '.join(t.__name__ for t in types)}")
    _check_meta_values(path, meta)
    return meta


def _check_meta_values(path: Path, meta: dict[str, Any]) -> None:
    modules = meta["modules"]
    if not modules or not all(isinstance(n, str) and n for n in modules) or len(set(modules)) != len(modules):
        raise DataError(f"{path}: field 'modules': expected a non-empty list of distinct module names")
    if meta["rank"] < 1:
        raise DataError(f"{path}: field 'rank': must be ≥ 1, got {meta['rank']}")
    if len(meta["tensor_sha256"]) != 64:
        raise DataError(f"{path}: field 'tensor_sha256': expected 64 hex digits")
    for key in ("energy", "shapes", "effective_rank"):
        if key in meta and set(meta[key]) != set(modules):
            odd = sorted(set(meta[key]) ^ set(modules))[0]
            raise DataError(f"{path}: field '{key}': module '{odd}' is not in (or missing from) 'modules'")
    for name, e in meta["energy"].items():
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0:
            raise DataError(f"{path}: field 'energy.{name}': expected a finite number ≥ 0")
    for name, shape in meta["shapes"].items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(_positive_int(d) for d in shape)):
            raise DataError(f"{path}: field 'shapes.{name}': expected [m, n], two positive integers")
    for name, k in meta.get("effective_rank", {}).items():
        if not (_positive_int(k) or k == 0) or k > meta["rank"]:
            raise DataError(f"{path}: field 'effective_rank.{name}': expected an integer in 0..rank")


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _check_tensors(
    path: Path, meta: dict[str, Any], tensors: dict[str, Tensor]
) -> tuple[dict[str, tuple[Tensor, Tensor, Tensor]], dict[str, Tensor]]:
    """Each module's U (m×k), S (k), V (n×k) and spectrum, as the metadata describes them."""
    expected = {f"{n}.{part}" for n in meta["modules"] for part in ("U", "S", "V", "spectrum")}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise DataError(f"{path}: unexpected tensor '{extra[0]}' (its module is not listed in subspace.json)")
    bases, spectra = {}, {}
    for name in meta["modules"]:
        missing = [
            f"{name}.{part}" for part in ("U", "S", "V", "spectrum") if f"{name}.{part}" not in tensors
        ]
        if missing:
            raise DataError(f"{path}: missing tensor '{missing[0]}' for module '{name}'")
        u, s, v, spec = (tensors[f"{name}.{part}"] for part in ("U", "S", "V", "spectrum"))
        m, n = meta["shapes"][name]
        k = u.shape[1] if u.ndim == 2 else -1
        want = {"U": ((m, k), f"[{m}, k]"), "S": ((k,), "[k]"), "V": ((n, k), f"[{n}, k]")}
        for part, t in (("U", u), ("S", s), ("V", v)):
            if k < 0 or tuple(t.shape) != want[part][0]:
                raise DataError(
                    f"{path}: tensor '{name}.{part}' has shape {list(t.shape)}, expected {want[part][1]} "
                    f"(shapes.{name} is [{m}, {n}] in subspace.json; k the same for U, S and V)"
                )
        if k > meta["rank"] or k != meta.get("effective_rank", {}).get(name, k):
            raise DataError(f"{path}: module '{name}': {k} directions, subspace.json records another rank")
        for part, t in (("U", u), ("S", s), ("V", v), ("spectrum", spec)):
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise DataError(f"{path}: tensor '{name}.{part}' is not a finite floating-point tensor")
        if spec.ndim != 1 or bool((s < 0).any()):
            raise DataError(f"{path}: module '{name}': singular values must be ≥ 0 and the spectrum 1-D")
        bases[name], spectra[name] = (u, s, v), spec
    return bases, spectra


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
    return subspace_from_factors(
        model,
        names,
        (ds, xs, loss),
        samples,
        rank=rank,
        n_tokens=int(batch["attention_mask"].sum()),
        spectrum_size=spectrum_size,
        svd=svd,
        model_ref=model_ref,
        weights=weights,
        started=t0,
    )


def subspace_from_factors(
    model: nn.Module,
    names: Sequence[str],
    factors: tuple[list[Tensor], list[Tensor], Tensor],
    samples: Sequence[ChatSample],
    *,
    rank: int,
    n_tokens: int,
    spectrum_size: int = 64,
    svd: SVDMethod = "auto",
    model_ref: str | None = None,
    weights: Sequence[float] | None = None,
    started: float | None = None,
    estimate: str = "separate",
) -> SafetySubspace:
    """The subspace of captured factors ``(ds, xs, loss)``: a separate pass
    (:func:`module_gradient_factors`) or the training step's own (:class:`spf.core.fused.FusedEstimate`)."""
    t0 = time.perf_counter() if started is None else started
    ds, xs, loss = factors
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"the safety loss is not finite ({float(loss)}): no subspace can be estimated")
    bases, energy, spectra = {}, {}, {}
    for name, top in zip(names, topk_svds(ds, xs, rank, spectrum_size, svd), strict=True):
        energy[name] = top.energy
        spectra[name] = top.s[:spectrum_size].float().cpu()
        k = top.u.shape[1]  # ≤ rank: directions under the noise floor are dropped
        bases[name] = (top.u, top.s[:k].float().clone(), top.v)

    digest = hashlib.sha256("".join(s.sha256() for s in samples).encode()).hexdigest()
    meta = {
        "model_ref": model_ref,
        # what the model being trained is checked against (spf.training.methods): architecture and weights
        "model_fingerprint": model_fingerprint(model),
        "weights_fingerprint": weights_fingerprint(model, names),
        "sample_hash": digest,
        "n_samples": len(samples),
        "n_tokens": n_tokens,
        "n_factor_rows": int(ds[0].shape[0]) if ds else 0,  # < n_tokens when rows share a prefix
        "safety_loss": float(loss.detach()),
        "estimator": "single" if len(samples) == 1 else "batch",
        "estimate": estimate,
        **({"weights": [float(w) for w in weights]} if weights is not None else {}),
        "seconds": round(time.perf_counter() - t0, 4),
    }
    sub = SafetySubspace(bases, energy, spectra, rank, meta)
    sub.metadata["effective_rank"] = sub.effective_rank
    sub.metadata["orthonormality_error"] = orthonormality_error(sub)
    eff = sub.effective_rank.values()
    logger.info(
        "estimated safety subspace (%s): %d modules, rank %d (effective %d..%d), %d tokens, "
        "max|UᵀU−I| %.1e, max|VᵀV−I| %.1e",
        estimate,
        len(bases),
        rank,
        min(eff, default=0),
        max(eff, default=0),
        n_tokens,
        sub.metadata["orthonormality_error"]["u"],
        sub.metadata["orthonormality_error"]["v"],
    )
    return sub


def random_like(sub: SafetySubspace, generator: torch.Generator) -> SafetySubspace:
    """The random-direction control (``spf.directions: random``): per module Haar-random orthonormal U, V
    with ``sub``'s effective rank, its singular values, energy and spectra kept — so a projection removes as
    many directions as SPF's, none of them the safety gradient's (except by chance)."""
    bases = {}
    for name, (u, s, v) in sub.bases.items():
        pair = [torch.randn(b.shape, generator=generator, dtype=torch.float64) for b in (u, v)]
        q_u, q_v = (torch.linalg.qr(b).Q.float().to(u.device) for b in pair)
        bases[name] = (q_u, s.clone(), q_v)
    meta = {**sub.metadata, "directions": "random", "estimate": "random"}
    return SafetySubspace(bases, dict(sub.energy), dict(sub.spectra), sub.rank, meta)


def orthonormality_error(sub: SafetySubspace) -> dict[str, float]:
    """``{"u": max|UᵀU − I|, "v": max|VᵀV − I|}`` over all modules: 0 up to fp32 rounding for a sound basis.
    A diagnostic the estimator records, since a non-orthonormal basis makes ``I − UUᵀ`` lengthen updates."""
    worst = {"u": 0.0, "v": 0.0}
    for u, _, v in sub.bases.values():
        worst["u"], worst["v"] = max(worst["u"], _gram_error(u)), max(worst["v"], _gram_error(v))
    return worst


def _gram_error(a: Tensor) -> float:
    if not a.shape[1]:
        return 0.0
    gram = a.double().T @ a.double()
    return float((gram - torch.eye(a.shape[1], dtype=gram.dtype, device=gram.device)).abs().max())


def module_shapes(model: nn.Module, names: Sequence[str]) -> dict[str, list[int]]:
    """``{name: [m, n]}``, the weight shape (out, in) of each named module found in ``unwrap(model)``
    (a peft LoRA layer reports its base weight's); names not found, or without a 2-D weight, are left out."""
    lookup = dict(unwrap(model).named_modules())
    out = {}
    for name in names:
        weight = getattr(lookup.get(name), "weight", None)
        if isinstance(weight, Tensor) and weight.ndim == 2:
            out[name] = [int(weight.shape[0]), int(weight.shape[1])]
    return out


def weights_fingerprint(model: nn.Module, names: Sequence[str]) -> str:
    """A short id of the named modules' weights (not just their shapes): a strided sample of ≤ 1024 values
    per module, rounded to bfloat16 so that the same model loaded in fp32 or bf16 gives the same id. Tells a
    subspace estimated on another model of the same architecture (another seed, another fine-tune)."""
    h = hashlib.sha256()
    lookup = dict(unwrap(model).named_modules())
    for name in names:
        weight = getattr(lookup.get(name), "weight", None)
        if not isinstance(weight, Tensor):
            continue
        flat = weight.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // 1024)][:1024].to(torch.bfloat16).view(torch.int16)
        h.update(name.encode() + b"\0" + picked.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_rank_available(sub: SafetySubspace, rank: int, flag: str, source: str) -> None:
    """DataError when no module of ``sub`` holds ``rank`` directions: the rank asked for (``flag``) is more
    than ``source`` (a sample, a subspace folder) can give, and would be recorded while fewer are used."""
    available = max(sub.effective_rank.values(), default=0)
    if rank > available:
        tokens = sub.metadata.get("n_tokens")
        raise DataError(
            f"{flag} {rank} is more than {source} provides: at most {available} directions in any module"
            + (
                f" (a module's gradient has rank ≤ min(its {tokens} tokens, the weight's m, n))"
                if tokens
                else ""
            )
            + f"; use {flag} ≤ {available}"
        )


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
    # a rank above what the sample gives would be recorded while fewer directions are used
    check_rank_available(sub, rank, "--rank / estimate.rank", "the safety sample")
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
