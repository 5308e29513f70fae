"""Safety subspace: per-module truncated SVD of the refusal-loss gradient w.r.t. each *effective* weight.

Why hooks instead of ``.grad``: for ``y = x Wᵀ`` the weight gradient is ``G = Σ_t δ_t x_tᵀ = Dᵀ X`` with
``D`` (T×m) the output gradients and ``X`` (T×n) the inputs over the T tokens of the sample. We capture
``X`` with a forward hook and ``D`` with ``torch.autograd.grad`` w.r.t. the module outputs, so

* it works for a peft LoRA layer at initialisation (B = 0): the hook sits on the LoRA layer, whose output
  is ``x (W₀ + s·B·A)ᵀ``, so ``Dᵀ X`` is the gradient w.r.t. the effective weight, while ∂L/∂A = 0;
* no parameter ``.grad`` is touched, so a re-estimation in the middle of a training step (SPFOptimizer's
  refresh) cannot corrupt the task gradients;
* ``rank(G) ≤ T``: with thin QRs ``Dᵀ = Q_d R_d`` and ``Xᵀ = Q_x R_x`` the exact SVD of ``G`` is that of the
  T×T core ``R_d R_xᵀ`` — O((m+n)·T²) per module instead of an SVD of an m×n matrix, and no m×n
  gradient is ever formed (one module at a time when T is so large that the dense route is cheaper).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from spf.core.losses import kept_position_loss
from spf.data.samples import ChatSample, collate, encode_sample, pad_token_id, save_samples
from spf.io import atomic_dir, save_json, save_tensors
from spf.models import default_target_modules, unwrap

logger = logging.getLogger(__name__)

__all__ = [
    "COMPLIANT_OPENING",
    "SafetySubspace",
    "SubspaceLoss",
    "cer_table",
    "estimate_batch_subspace",
    "estimate_from_samples",
    "estimate_safety_subspace",
    "margin_pair",
    "module_gradient_factors",
    "publish_estimate",
    "subspace_overlap",
]

FORMAT_VERSION = 1
SVDMethod = Literal["auto", "factored", "dense"]
# what the subspace protects: ce = the refusal's cross-entropy; margin = CE(refusal) − CE(compliant opening)
SubspaceLoss = Literal["ce", "margin"]


@dataclass
class SafetySubspace:
    """Per-module top-k singular triplets of the safety gradient.

    ``bases[name] = (U, S, V)`` with U: m×k, S: k, V: n×k (fp32, orthonormal columns); ``energy[name]``
    is ‖G‖_F² (all singular values), ``spectra[name]`` the leading singular values (≥ k of them when the
    gradient has that rank), so ``cer(k)`` is exact for every k ≤ len(spectrum).
    """

    bases: dict[str, tuple[Tensor, Tensor, Tensor]]
    energy: dict[str, float]
    spectra: dict[str, Tensor]
    rank: int
    metadata: dict = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return list(self.bases)

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
        return SafetySubspace(
            bases, dict(self.energy), dict(self.spectra), min(k, self.rank), dict(self.metadata)
        )

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
            raise ValueError(
                f"{meta_path}: field 'format_version': unsupported {meta.get('format_version')!r}"
            )
        tensors = load_file(str(tensor_path))
        bases, spectra = {}, {}
        for name in meta["modules"]:
            try:
                bases[name] = (tensors[f"{name}.U"], tensors[f"{name}.S"], tensors[f"{name}.V"])
                spectra[name] = tensors[f"{name}.spectrum"]
            except KeyError as e:
                raise ValueError(f"{tensor_path}: missing tensor {e} for module '{name}'") from None
        energy = {k: float(v) for k, v in meta.pop("energy").items()}
        rank = int(meta.pop("rank"))
        for key in ("format_version", "modules", "mean_cer"):
            meta.pop(key, None)
        return cls(bases, energy, spectra, rank, meta)


def publish_estimate(sub: SafetySubspace, samples: Sequence[ChatSample], dest: str | Path) -> Path:
    """Write an estimate as one folder: the subspace, the sample(s) it came from (``sample.jsonl`` — what
    a reader needs to reproduce or audit it) and the CER at k = 1, 5, 10, 20, mean and per module (``cer.json``). Built
    beside ``dest`` and renamed into place: the pipeline's estimate stage and the benchmark both use it."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        sub.save(tmp)
        save_samples(list(samples), tmp / "sample.jsonl")
        ks = (1, 5, 10, 20)
        cer = {"mean": {str(k): sub.mean_cer(k) for k in ks}, "per_module": {str(k): sub.cer(k) for k in ks}}
        save_json(cer, tmp / "cer.json")
    return dest


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
    model: nn.Module,
    tokenizer,
    sample: ChatSample,
    *,
    rank: int,
    modules: Sequence[str] | None = None,
    max_length: int = 512,
    spectrum_size: int = 64,
    svd: SVDMethod = "auto",
    model_ref: str | None = None,
) -> SafetySubspace:
    """Subspace of ONE (harmful prompt, refusal) sample. See :func:`estimate_batch_subspace`."""
    sub = estimate_batch_subspace(
        model,
        tokenizer,
        [sample],
        rank=rank,
        modules=modules,
        max_length=max_length,
        spectrum_size=spectrum_size,
        svd=svd,
        model_ref=model_ref,
    )
    sub.metadata["estimator"] = "single"
    return sub


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
    for name, (u, s, v, total) in zip(names, _topk_svds(ds, xs, rank, spectrum_size, svd), strict=True):
        energy[name] = total
        spectra[name] = s[:spectrum_size].float().cpu()
        k = min(rank, s.numel())
        bases[name] = (u[:, :k].float().contiguous(), s[:k].float().clone(), v[:, :k].float().contiguous())

    digest = hashlib.sha256("".join(s.sha256() for s in samples).encode()).hexdigest()
    meta = {
        "model_ref": model_ref,
        "sample_hash": digest,
        "n_samples": len(samples),
        "n_tokens": n_tokens,
        "n_factor_rows": int(ds[0].shape[0]) if ds else 0,  # < n_tokens when rows share a prefix
        "safety_loss": float(loss.detach()),
        "estimator": "batch",
        **({"weights": [float(w) for w in weights]} if weights is not None else {}),
        "seconds": round(time.perf_counter() - t0, 4),
    }
    sub = SafetySubspace(bases, energy, spectra, rank, meta)
    logger.debug("estimated safety subspace: %d modules, rank %d, %d tokens", len(bases), rank, n_tokens)
    return sub


def module_gradient_factors(
    model: nn.Module,
    batch: dict[str, Tensor],
    names: Sequence[str],
    *,
    weights: Sequence[float] | None = None,
    merge_prefixes: bool = True,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Factors ``D`` (T×m) and ``X`` (T×n) of each named module's weight gradient ``G = Dᵀ X``.

    The loss is the mean (or ``weights``-weighted mean) over the batch's rows of each row's response-token
    cross-entropy. ``batch`` is what :func:`spf.data.samples.collate` returns, on the model's device; T counts the
    unpadded tokens of all rows (padded positions have zero gradient and are dropped). With
    ``merge_prefixes`` tokens that share their whole causal prefix with a token of an earlier row (the chat
    template's system prompt; a margin pair's common prompt) have the same input ``x`` in every module, so
    their rows of ``D`` are summed into one row — ``G`` is unchanged, T shrinks (a margin pair: ~1/3 fewer
    rows, and the estimator's T×T eigen-problems cost T³). Returns
    ``(ds, xs, loss)`` in ``names`` order. The model is in eval mode for the one forward/backward pass and
    restored afterwards; parameters are frozen during it and their ``.grad`` fields are left untouched.
    The one place that captures module gradients: the subspace estimator and ``spf analyze`` both use it.
    """
    base = unwrap(model)
    lookup = dict(base.named_modules())
    keep = batch["attention_mask"].bool()
    all_kept = bool(keep.all())
    labels = batch["labels"]
    # Logits are needed only where a response token is predicted: skipping the LM head (a fifth of
    # SmolLM2's compute) on prompt positions makes the pass cheaper, the gradient identical.
    positions = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)
    if positions.numel() == 0:
        raise ValueError("no supervised (response) token in the batch")

    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(_mod: nn.Module, args: tuple, out: Tensor) -> None:
            x = args[0].detach()
            # without padding a view suffices; boolean indexing would copy every module's input
            inputs[name] = x.reshape(-1, x.shape[-1]) if all_kept else x[keep]
            outputs[name] = out

        return hook

    # The output of the embedding must require grad, or a fully frozen model (no LoRA, full FT
    # disabled) would build no graph to the module outputs.
    def embed_hook(_mod: nn.Module, _args: tuple, out: Tensor) -> Tensor:
        return out if out.requires_grad else out.detach().requires_grad_(True)

    handles = [lookup[n].register_forward_hook(make_hook(n)) for n in names]
    handles.append(base.get_input_embeddings().register_forward_hook(embed_hook))
    was_training = model.training
    model.eval()
    # Parameters are frozen for the pass: autograd then saves only what the output gradients need (no
    # inputs kept for weight gradients), which keeps the pass's memory and time down.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            out = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=positions
            )
            losses = kept_position_loss(out.logits, labels[:, positions + 1])
            if weights is None:
                loss = losses.mean()
            else:
                loss = (losses * torch.tensor(list(weights), dtype=losses.dtype, device=losses.device)).mean()
            grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)

    n_tokens = int(keep.sum())
    merge = _shared_prefix_rows(batch["input_ids"], keep) if merge_prefixes else None
    ds, xs = [], []
    for name, g_out in zip(names, grads, strict=True):
        x = inputs.pop(name)
        m = outputs[name].shape[-1]
        d = torch.zeros(n_tokens, m, device=x.device, dtype=x.dtype) if g_out is None else g_out[keep]
        if merge is not None:
            rows, owner = merge
            d = torch.zeros(rows.numel(), m, device=d.device, dtype=d.dtype).index_add_(0, owner, d)
            x = x[rows]
        ds.append(d)
        xs.append(x)
    outputs.clear()
    return ds, xs, loss.detach()


def _shared_prefix_rows(input_ids: Tensor, keep: Tensor) -> tuple[Tensor, Tensor] | None:
    """Which kept tokens to keep as factor rows, and the row each kept token's ``D`` row is summed into.

    Rows are right-padded (:func:`spf.data.samples.collate`) and causal, so a token whose ids up to and including
    itself equal another row's has the same hidden states — the same ``x`` at every module. Token ``t`` of
    row ``b`` is mapped to the same position of the earlier row with the longest common prefix (already
    mapped itself, so chains resolve). Returns ``(rows, owner)`` over the flattened kept tokens (the order
    of ``x[keep]``), or ``None`` when nothing is shared.
    """
    n_rows = input_ids.shape[0]
    if n_rows < 2:
        return None
    ids, kept = input_ids.cpu(), keep.cpu()
    lengths = kept.sum(1)
    # only contiguous (right-padded) rows qualify: positions and attention then match token for token
    contiguous = [bool(kept[b, : int(lengths[b])].all()) for b in range(n_rows)]
    # each kept token's index in x[keep]; shared tokens are then pointed at their owner's
    canon = torch.full(kept.shape, -1, dtype=torch.long)
    canon[kept] = torch.arange(int(kept.sum()))
    for b in range(1, n_rows):
        if not contiguous[b]:
            continue
        best_a, best_p = -1, 0
        for a in range(b):
            if not contiguous[a]:
                continue
            n = int(min(lengths[a], lengths[b]))
            differ = (ids[a, :n] != ids[b, :n]).nonzero()
            p = n if differ.numel() == 0 else int(differ[0, 0])
            if p > best_p:
                best_a, best_p = a, p
        if best_p:
            canon[b, :best_p] = canon[best_a, :best_p]
    owner_flat = canon[kept]
    rows, owner = torch.unique(owner_flat, sorted=True, return_inverse=True)
    if rows.numel() == owner_flat.numel():
        return None
    device = input_ids.device
    return rows.to(device), owner.to(device)


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
    elif len(samples) == 1:
        used = list(samples)
        sub = estimate_safety_subspace(model, tokenizer, used[0], **kwargs)
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


def _svd_of_outer(d: Tensor, x: Tensor, *, method: SVDMethod = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD of ``G = Dᵀ X`` (D: T×m, X: T×n) → U (m×r), S (r), V (n×r), r = min(T, m, n)."""
    t, m = d.shape
    n = x.shape[1]
    if method == "dense" or (method == "auto" and t >= min(m, n)):
        u, s, vh = torch.linalg.svd(d.T.float() @ x.float(), full_matrices=False)
        return u, s, vh.T
    r = min(t, m, n)
    u, s, v, _ = _topk_svds([d], [x], r, r, "factored")[0]
    return u, s.to(d.dtype), v


def _topk_svds(
    ds: list[Tensor], xs: list[Tensor], rank: int, n_values: int, method: SVDMethod
) -> list[tuple[Tensor, Tensor, Tensor, float]]:
    """Per module (U, S, V, ‖G‖²_F) of ``G = Dᵀ X``; the T×T eigen-problems of all modules run batched.

    With ``X Xᵀ = E Λ Eᵀ``: ``X = E Λ^½ Q_xᵀ`` where ``Q_x = Xᵀ E Λ^-½`` has orthonormal columns, so
    ``G = H Q_xᵀ`` with ``H = Dᵀ E Λ^½``. From ``HᵀH = Λ^½ Eᵀ (D Dᵀ) E Λ^½ = W Σ² Wᵀ``:
    ``U = H W Σ⁻¹ = Dᵀ (E Λ^½ W Σ⁻¹)`` and ``V = Xᵀ (E Λ^-½ W)``. The T×T algebra runs in fp64 (the Gram
    matrices square the condition number); the thin products with D and X run in their own dtype.
    Returns ``n_values`` singular values (fp64) and ``rank`` singular vectors per module.
    """
    t = ds[0].shape[0] if ds else 0
    dense = [
        method == "dense" or (method == "auto" and t >= min(d.shape[1], x.shape[1]))
        for d, x in zip(ds, xs, strict=True)
    ]
    results: list[tuple[Tensor, Tensor, Tensor, float] | None] = [None] * len(ds)
    gram_idx = [i for i, is_dense in enumerate(dense) if not is_dense]
    if gram_idx:
        # Gram matrices in fp32 (fast BLAS3); every T×T step in fp64 and batched over modules, so two
        # batched eigen-decompositions serve the whole model.
        k_d = torch.stack([(ds[i] @ ds[i].T) for i in gram_idx]).double()
        k_x = torch.stack([(xs[i] @ xs[i].T) for i in gram_idx]).double()
        lam, e = torch.linalg.eigh(k_x)
        lam = lam.clamp_min(0)
        tol = lam.amax(dim=1, keepdim=True).clamp_min(1e-300) * 1e-12
        root = lam.sqrt()
        inv_root = torch.where(lam > tol, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
        er = e * root.unsqueeze(1)  # E Λ^½
        sig2, w = torch.linalg.eigh(er.transpose(1, 2) @ k_d @ er)  # ascending
        sig2, w = sig2.flip(-1).clamp_min(0), w.flip(-1)
        sig = sig2.sqrt()
        top_w = w[:, :, :rank]
        s_top = sig[:, :rank]
        floor = sig[:, :1].clamp_min(1e-300) * 1e-10
        inv_sig = torch.where(s_top > floor, 1.0 / s_top.clamp_min(1e-300), torch.zeros_like(s_top))
        coef_u = (er @ top_w * inv_sig.unsqueeze(1)).float()  # U = Dᵀ coef_u
        coef_v = ((e * inv_root.unsqueeze(1)) @ top_w).float()  # V = Xᵀ coef_v
        energies = (k_d * k_x).sum(dim=(1, 2))  # ‖DᵀX‖²_F = tr(K_d K_x), exact
        for j, i in enumerate(gram_idx):
            results[i] = (ds[i].T @ coef_u[j], sig[j, :n_values], xs[i].T @ coef_v[j], float(energies[j]))
    for i, is_dense in enumerate(dense):
        if is_dense:
            u, s, v = _svd_of_outer(ds[i], xs[i], method="dense")
            results[i] = (u[:, :rank], s[:n_values], v[:, :rank], float((s.double() ** 2).sum()))
    return results  # type: ignore[return-value]


def cer_table(sub: SafetySubspace, ks: Sequence[int] = (1, 5, 10, 20)) -> str:
    """Plain-text table: per module CER@k, plus the mean row."""
    cers = {k: sub.cer(k) for k in ks}
    width = max((len(n) for n in sub.modules), default=6)
    lines = [f"{'module':<{width}}  " + "  ".join(f"CER@{k:<3}" for k in ks)]
    for name in sub.modules:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{cers[k][name]:7.3f}" for k in ks))
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{sub.mean_cer(k):7.3f}" for k in ks))
    return "\n".join(lines)
