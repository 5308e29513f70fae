"""Module gradients as factors ``G = Dᵀ X``, and their exact (truncated) SVD without forming ``G``.

For ``y = x Wᵀ`` the weight gradient is ``G = Σ_t δ_t x_tᵀ = Dᵀ X`` with ``D`` (T×m) the output gradients
and ``X`` (T×n) the inputs over the T tokens. :func:`module_gradient_factors` captures both (a forward
hook for ``X``, ``torch.autograd.grad`` w.r.t. the module outputs for ``D``); ``rank(G) ≤ T``, so the SVD
of ``G`` reduces to T×T problems — O((m+n)·T²) per module instead of an SVD of an m×n matrix.

Numerics (why fp64, why a noise floor, why a final QR): the factors come from an fp32 (or bf16) forward
and backward pass, so ``G`` is known only up to the rounding of its factors. By Weyl's inequality a
perturbation ``δG`` moves every singular value by at most ``‖δG‖₂``, and rounding each factor to unit
roundoff ``ε/2`` gives ``‖δG‖₂ ≤ ε·‖D‖·‖X‖`` (to first order): singular values below that are
indistinguishable from rounding noise and their singular vectors are arbitrary. A sample of T tokens
makes ``G`` rank ≤ T, and repeated inputs (layer 0 sees the same embedding for a repeated token) or a zero
output-gradient row (the last token predicts nothing) lower it further, so a requested rank at or above
the numerical rank *always* reaches that noise. Hence: the Gram matrices are formed in fp64 (in fp32 they
would resolve σ only to ~√ε₃₂·σ₁ ≈ 3e-4·σ₁, far above the data's own noise), directions below the noise
floor are dropped (the *effective rank* may be < the requested rank), and the kept columns are
re-orthonormalised (QR, signs fixed so each column stays close to its singular vector) — a projector
``I − UUᵀ`` with non-orthonormal ``U`` would lengthen updates instead of shortening them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from spf.core.losses import row_losses
from spf.models import unwrap

__all__ = ["SVDMethod", "TopK", "module_gradient_factors", "thin_svd_of_outer", "topk_svds"]

SVDMethod = Literal["auto", "factored", "dense"]

# The Gram route squares the condition number: in fp64 it resolves σᵢ only down to ~√ε₆₄·σ₁ ≈ 1.5e-8·σ₁
# (and the eigenvectors, from which U and V are built, only somewhat above that); 16× that is the least
# relative floor we trust, whatever the factors' dtype (it matters only for fp64 factors: fp32 rounding
# noise already sits higher).
_GRAM_RESOLUTION = 16 * torch.finfo(torch.float64).eps ** 0.5


class TopK(NamedTuple):
    """One module's truncated SVD: ``u`` (m×k) and ``v`` (n×k) fp32 with orthonormal columns, k ≤ the
    requested rank (only directions above the noise floor); ``s`` the leading singular values (fp64,
    ``n_values`` of them, noise included, so CER stays exact); ``energy`` = ‖G‖²_F."""

    u: Tensor
    s: Tensor
    v: Tensor
    energy: float


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
    cross-entropy. ``batch`` is what :func:`spf.data.samples.collate` returns, on the model's device; T counts
    the unpadded tokens of all rows (padded positions have zero gradient and are dropped). With
    ``merge_prefixes`` tokens that share their whole causal prefix with a token of an earlier row (the chat
    template's system prompt; a margin pair's common prompt) have the same input ``x`` in every module, so
    their rows of ``D`` are summed into one row — ``G`` is unchanged, T shrinks (a margin pair: ~1/3 fewer
    rows, and the estimator's T×T eigen-problems cost T³). Returns ``(ds, xs, loss)`` in ``names`` order.
    The model is in eval mode for the one forward/backward pass and restored afterwards; parameters are
    frozen during it and their ``.grad`` fields are left untouched. The one place that captures module
    gradients: the subspace estimator and ``spf analyze`` both use it.
    """
    base = unwrap(model)
    lookup = dict(base.named_modules())
    keep = batch["attention_mask"].bool()
    all_kept = bool(keep.all())
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
            losses = row_losses(model, batch)
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
        d, x = merge_shared_rows(d, x, merge)
        ds.append(d)
        xs.append(x)
    outputs.clear()
    return ds, xs, loss.detach()


def merge_shared_rows(d: Tensor, x: Tensor, merge: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """One module's factors with the tokens of :func:`_shared_prefix_rows` merged: each shared token's ``D``
    row summed into its owner's, only the owners' ``X`` rows kept (``G = Dᵀ X`` unchanged)."""
    if merge is None:
        return d, x
    rows, owner = merge
    return torch.zeros(rows.numel(), d.shape[1], device=d.device, dtype=d.dtype).index_add_(0, owner, d), x[
        rows
    ]


def _shared_prefix_rows(input_ids: Tensor, keep: Tensor) -> tuple[Tensor, Tensor] | None:
    """Which kept tokens to keep as factor rows, and the row each kept token's ``D`` row is summed into.

    Rows are right-padded (:func:`spf.data.samples.collate`) and causal, so a token whose ids up to and
    including itself equal another row's has the same hidden states — the same ``x`` at every module. Token
    ``t`` of row ``b`` is mapped to the same position of the earlier row with the longest common prefix
    (already mapped itself, so chains resolve). Returns ``(rows, owner)`` over the flattened kept tokens (the
    order of ``x[keep]``), or ``None`` when nothing is shared.
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


# ------------------------------------------------------------------------------------------- exact SVD


def thin_svd_of_outer(d: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD of ``G = Dᵀ X`` (D: T×m, X: T×n) → U (m×r) fp32, S (r, descending) fp64, V (n×r)
    fp32, r = min(T, m, n); all r triplets, zero singular values included (use :func:`topk_svds` for a
    truncated, noise-free basis).

    With thin QRs ``Dᵀ = Q_d R_d`` and ``Xᵀ = Q_x R_x``, ``G = Q_d (R_d R_xᵀ) Q_xᵀ``: the SVD of the T×T core
    gives G's, in fp64, and U, V have orthonormal columns by construction. When T ≥ min(m, n) the dense
    m×n gradient is the smaller problem and is decomposed directly.
    """
    t, m = d.shape
    n = x.shape[1]
    if t >= min(m, n):
        u, s, vh = torch.linalg.svd(d.double().T @ x.double(), full_matrices=False)
        return u.float(), s, vh.T.float()
    qd, rd = torch.linalg.qr(d.T.double())
    qx, rx = torch.linalg.qr(x.T.double())
    uc, s, vch = torch.linalg.svd(rd @ rx.T)
    return (qd @ uc).float(), s, (qx @ vch.T).float()


def _noise_floor(d_norm: Tensor, x_norm: Tensor, s_max: Tensor, dtype: torch.dtype) -> Tensor:
    """The σ below which a direction of ``G = Dᵀ X`` is noise (see the module docstring): the rounding of
    factors stored in ``dtype`` (ε·‖D‖_F·‖X‖_F, Frobenius norms as cheap upper bounds of the spectral
    ones), and never below what the fp64 Gram route resolves."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return torch.maximum(eps * d_norm * x_norm, _GRAM_RESOLUTION * s_max)


def _orthonormal(a: Tensor) -> Tensor:
    """Orthonormal columns spanning ``a``'s (fp64 QR); signs fixed so that column i stays ≈ ``a[:, i]``
    when ``a`` is already nearly orthonormal (diag(R) > 0)."""
    if a.shape[-1] == 0:
        return a
    q, r = torch.linalg.qr(a)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign[sign == 0] = 1
    return q * sign.unsqueeze(-2)


def _finish(u: Tensor, s: Tensor, v: Tensor, floor: Tensor, rank: int, n_values: int) -> tuple:
    """Keep the top ``rank`` directions above ``floor`` (σ descending), re-orthonormalise, cast to fp32."""
    k = int((s[:rank] > floor).sum())
    u, v = _orthonormal(u[:, :k].double()), _orthonormal(v[:, :k].double())
    return u.float().contiguous(), s[:n_values].double(), v.float().contiguous()


def _gram_route(ds: list[Tensor], xs: list[Tensor], rank: int, n_values: int) -> list[TopK]:
    """Top-``rank`` triplets of each ``G = Dᵀ X`` from T×T problems, batched over modules.

    Any factor ``L`` with ``L Lᵀ = X Xᵀ`` writes ``X = L Q_xᵀ`` (``Q_x`` orthonormal), so ``G = H Q_xᵀ``
    with ``H = Dᵀ L``; ``HᵀH = Lᵀ (D Dᵀ) L = W Σ² Wᵀ`` gives ``U = Dᵀ (L W Σ⁻¹)`` and
    ``V = Gᵀ U Σ⁻¹ = Xᵀ (D Dᵀ L W Σ⁻²)`` — no ``L⁻¹``, which would amplify the noise of X's near-zero
    directions (repeated inputs) into V. ``L`` is the Cholesky factor (a ninth of an eigen-decomposition's
    time at T = 60), or ``E Λ^½`` from ``X Xᵀ = E Λ Eᵀ`` where Cholesky fails (X Xᵀ numerically singular).
    Modules that read the same input (q/k/v, gate/up) share one ``X Xᵀ`` and one factor.
    """
    d64 = [d.double() for d in ds]
    uniq, slot = _distinct_inputs(xs)
    x64 = [x.double() for x in uniq]
    # Gram matrices in fp64 (see the module docstring)
    k_d = torch.stack([d @ d.T for d in d64])
    k_x = torch.stack([x @ x.T for x in x64])
    fac = _gram_factor(k_x)[slot]
    k_x = k_x[slot]
    sig2, w = torch.linalg.eigh(fac.transpose(1, 2) @ k_d @ fac)  # ascending
    sig, w = sig2.flip(-1).clamp_min(0).sqrt(), w.flip(-1)
    top_w, s_top = w[:, :, :rank], sig[:, :rank]
    inv_sig = torch.where(s_top > 0, 1.0 / s_top.clamp_min(1e-300), torch.zeros_like(s_top))
    coef_u = fac @ top_w * inv_sig.unsqueeze(1)  # U = Dᵀ coef_u
    coef_v = k_d @ coef_u * inv_sig.unsqueeze(1)  # V = Xᵀ coef_v
    energies = (k_d * k_x).sum(dim=(1, 2))  # ‖DᵀX‖²_F = tr(K_d K_x), exact
    d_norm = k_d.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(0).sqrt()
    x_norm = k_x.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(0).sqrt()
    out = []
    for i, d in enumerate(d64):
        floor = _noise_floor(d_norm[i], x_norm[i], sig[i, 0], ds[i].dtype)
        u, s, v = _finish(d.T @ coef_u[i], sig[i], x64[slot[i]].T @ coef_v[i], floor, rank, n_values)
        out.append(TopK(u, s, v, float(energies[i])))
    return out


def _distinct_inputs(xs: list[Tensor]) -> tuple[list[Tensor], list[int]]:
    """The distinct inputs and each module's slot among them: a module whose input equals the previous
    module's (q/k/v and gate/up read one hidden state; names come in model order) shares its slot."""
    uniq: list[Tensor] = []
    slot: list[int] = []
    for x in xs:
        prev = uniq[-1] if uniq else None
        same = prev is not None and prev.shape == x.shape and prev.dtype == x.dtype and torch.equal(prev, x)
        if not same:
            uniq.append(x)
        slot.append(len(uniq) - 1)
    return uniq, slot


def _gram_factor(k: Tensor) -> Tensor:
    """``L`` with ``L Lᵀ = K`` for each PSD ``K`` of the batch: Cholesky, ``E Λ^½`` where it fails."""
    fac, info = torch.linalg.cholesky_ex(k)
    bad = (info != 0).nonzero().flatten()
    if bad.numel():
        lam, e = torch.linalg.eigh(k[bad])
        fac[bad] = e * lam.clamp_min(0).sqrt().unsqueeze(1)
    return fac


def topk_svds(
    ds: list[Tensor], xs: list[Tensor], rank: int, n_values: int, method: SVDMethod = "auto"
) -> list[TopK]:
    """Per module the top-``rank`` (at most) singular triplets of ``G = Dᵀ X`` above the noise floor.

    Gram route (T < min(m, n), or ``method="factored"``): :func:`_gram_route`, all modules' T×T problems
    batched. Dense route otherwise: the SVD of the m×n ``G``. Both end in :func:`_finish` (noise floor,
    QR). Returns one :class:`TopK` per module, in order.
    """
    t = ds[0].shape[0] if ds else 0
    dense = [
        method == "dense" or (method == "auto" and t >= min(d.shape[1], x.shape[1]))
        for d, x in zip(ds, xs, strict=True)
    ]
    results: list[TopK | None] = [None] * len(ds)
    gram_idx = [i for i, is_dense in enumerate(dense) if not is_dense]
    if gram_idx:
        for i, top in zip(
            gram_idx,
            _gram_route([ds[i] for i in gram_idx], [xs[i] for i in gram_idx], rank, n_values),
            strict=True,
        ):
            results[i] = top
    for i, is_dense in enumerate(dense):
        if is_dense:
            d, x = ds[i], xs[i]
            u, s, vh = torch.linalg.svd(d.T.float() @ x.float(), full_matrices=False)
            floor = _noise_floor(d.double().norm(), x.double().norm(), s[0].double(), d.dtype)
            energy = float((s.double() ** 2).sum())
            results[i] = TopK(*_finish(u, s.double(), vh.T, floor, rank, n_values), energy)
    return results  # type: ignore[return-value]
