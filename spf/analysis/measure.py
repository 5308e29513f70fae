"""The paper's three insights, measured on a model: ``spf analyze``.

(I) **CER spectra.** The cumulative energy ratio ``CER(k) = Σ_{i≤k} σᵢ² / Σᵢ σᵢ²`` of a per-module
    gradient, k = 1…max_k, for safety (harmful prompt → refusal) gradients against utility (SST-2, AG News,
    GSM8K) gradients. One sample's gradient of a linear layer is ``G = Dᵀ X`` over its T tokens, so its rank
    is ≤ T and a short sample has a "concentrated" spectrum whatever it is about. The comparison is
    therefore made *like for like*: every safety sample is paired with a utility sample of (nearly) the same
    token count (chosen from a pool, or truncated to that count when none is close), singles against
    singles and batches of n against batches of n; the token counts used are recorded.
(II) **Gradient conflict.** ``cos(g_safety, g_utility)`` between the single safety sample's gradient and
    each of ≥ 100 utility samples' gradients (weights of the chosen modules), overall (all modules
    flattened) and per layer: distribution and fraction negative.
(III) **Subspace stability.** The overlap φ (:func:`spf.core.subspace.subspace_overlap`, rank k) of single-sample
    safety subspaces with the batch subspace of 1, 4, 16, 64 samples, and between different single samples.

Every gradient is the gradient of a sample's mean token cross-entropy over its response (a batch: the mean
over samples, as in :func:`spf.core.subspace.estimate_batch_subspace`) w.r.t. each module's *effective* weight,
captured with hooks as factors ``(D, X)``; inner products and norms are computed from the T×T Gram
matrices and never form an m×n gradient, SVDs of one sample use thin QRs of the factors (exact), batch
gradients are accumulated densely. Bias gradients are not included (Llama linears have none).

:func:`run_analysis` returns a plain dict (all numbers); :func:`write_analysis` writes ``analysis.json``,
PNG figures and ``summary.md`` (:func:`render_markdown`) into a folder, atomically.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import itertools
import logging
import math
import random
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spf.core.subspace import SafetySubspace, module_gradient_factors, subspace_overlap
from spf.data.samples import ChatSample, DataError, encode_sample, load_samples
from spf.io import atomic_dir, save_json
from spf.models import default_target_modules, unwrap

logger = logging.getLogger(__name__)

__all__ = [
    "UTILITY_TASKS",
    "Factors",
    "TokenMatch",
    "cer_curve",
    "factor_cosines",
    "factor_svd",
    "gradient_factors",
    "layer_of",
    "load_utility",
    "match_token_counts",
    "module_type",
    "plot_analysis",
    "render_markdown",
    "run_analysis",
    "select_modules",
    "truncate_encoded",
    "write_analysis",
]

FORMAT = "spf-analysis"
FORMAT_VERSION = 1
UTILITY_TASKS: tuple[str, ...] = ("sst2", "agnews", "gsm8k")
SUMMARY_KS: tuple[int, ...] = (1, 5, 10, 20)
_IGNORE = -100
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


# ------------------------------------------------------------------------------------------- module names


def layer_of(name: str) -> int | None:
    """Decoder layer index of a module name (``model.layers.12.mlp.up_proj`` → 12), None if it has none."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """Last component of a module name (``q_proj``, ``down_proj``, …)."""
    return name.rsplit(".", 1)[-1]


def select_modules(
    model: nn.Module, patterns: Sequence[str] | None = None, *, layer_stride: int = 1
) -> list[str]:
    """The decoder linears (:func:`default_target_modules`) matching any of ``patterns`` (exact names or
    ``fnmatch`` globs; None = all) whose layer index is a multiple of ``layer_stride``."""
    if layer_stride < 1:
        raise ValueError(f"layer_stride must be ≥ 1, got {layer_stride}")
    names = default_target_modules(model)
    if patterns:
        unmatched = [p for p in patterns if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(
                f"--modules: no decoder linear matches {unmatched[:5]} (e.g. {names[0] if names else '—'})"
            )
        names = [n for n in names if any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns)]
    if layer_stride > 1:
        names = [n for n in names if (layer_of(n) or 0) % layer_stride == 0]
    if not names:
        raise ValueError("no modules left to analyse")
    return names


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
    n_supervised = int((labels[0, 1:] != _IGNORE).sum())
    if n_supervised == 0:
        raise ValueError("sample has no supervised (response) token")
    d_list, x_list, loss = module_gradient_factors(model, batch, modules)
    ds = {name: d.float() for name, d in zip(modules, d_list, strict=True)}
    xs = {name: x.float() for name, x in zip(modules, x_list, strict=True)}
    return Factors(ds, xs, int(input_ids.shape[1]), n_supervised, float(loss))


def factor_svd(d: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD of ``G = Dᵀ X`` → U (m×r), S (r, descending), V (n×r), r = min(T, m, n).

    With ``Dᵀ = Q_d R_d`` and ``Xᵀ = Q_x R_x`` (thin QRs), ``G = Q_d (R_d R_xᵀ) Q_xᵀ``: the SVD of the T×T core
    gives G's, in fp64. When T ≥ min(m, n) the dense m×n gradient is smaller, and is decomposed directly.
    """
    t, m = d.shape
    n = x.shape[1]
    if t >= min(m, n):
        u, s, vh = torch.linalg.svd((d.T @ x).double(), full_matrices=False)
        return u.float(), s, vh.T.float()
    qd, rd = torch.linalg.qr(d.T.double())
    qx, rx = torch.linalg.qr(x.T.double())
    uc, s, vch = torch.linalg.svd(rd @ rx.T)
    return (qd @ uc).float(), s, (qx @ vch.T).float()


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


def _cosine(pairs: Iterable[tuple[float, float, float]]) -> float:
    inner = na = nb = 0.0
    for i, a, b in pairs:
        inner, na, nb = inner + i, na + a, nb + b
    return inner / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0


# ---------------------------------------------------------------------------------------- token matching


@dataclass(frozen=True)
class TokenMatch:
    """A utility sample chosen for a safety sample of ``target`` tokens (``how``: matched / truncated /
    shorter — the last when no candidate is long enough; ``index`` into the candidate list)."""

    target: int
    index: int
    tokens: int  # the candidate's own token count
    used: int  # tokens after truncation (== tokens unless truncated)
    how: str


def match_token_counts(
    targets: Sequence[int], candidates: Sequence[int], *, tolerance: float = 0.1, min_tolerance: int = 2
) -> list[TokenMatch]:
    """For each target count (in order) an unused candidate with ``|tokens − target| ≤ max(min_tolerance,
    tolerance·target)``, the closest first; else the shortest longer one, truncated to ``target``; else the
    longest shorter one. Candidates are used once while there are enough of them."""
    if not candidates:
        raise ValueError("no candidate samples to match token counts against")
    used: set[int] = set()
    out: list[TokenMatch] = []
    for target in targets:
        free = [i for i in range(len(candidates)) if i not in used] or list(range(len(candidates)))
        tol = max(min_tolerance, tolerance * target)
        close = [i for i in free if abs(candidates[i] - target) <= tol]
        if close:
            i = min(close, key=lambda j: (abs(candidates[j] - target), j))
            match = TokenMatch(target, i, candidates[i], candidates[i], "matched")
        else:
            longer = [i for i in free if candidates[i] > target]
            if longer:
                i = min(longer, key=lambda j: (candidates[j], j))
                match = TokenMatch(target, i, candidates[i], target, "truncated")
            else:
                i = max(free, key=lambda j: (candidates[j], -j))
                match = TokenMatch(target, i, candidates[i], candidates[i], "shorter")
        used.add(match.index)
        out.append(match)
    return out


def truncate_encoded(encoded: dict[str, list[int]], n: int) -> dict[str, list[int]]:
    """An encoded sample cut to ``n`` tokens, keeping at least one supervised token: the first n tokens
    (whole prompt, start of the answer) when the prompt is shorter than n, else the prompt's last n − 1
    tokens and the answer's first token."""
    ids, labels = encoded["input_ids"], encoded["labels"]
    if n >= len(ids):
        return encoded
    if n < 2:
        raise ValueError(f"cannot truncate to {n} tokens: need ≥ 2 (a prompt and a response token)")
    n_prompt = next((i for i, lab in enumerate(labels) if lab != _IGNORE), len(labels))
    keep = list(range(n)) if n_prompt < n else [*range(n_prompt - (n - 1), n_prompt), n_prompt]
    new_ids = [ids[i] for i in keep]
    new_labels = [labels[i] for i in keep]
    return {"input_ids": new_ids, "labels": new_labels, "attention_mask": [1] * len(new_ids)}


def _n_supervised(encoded: dict[str, list[int]]) -> int:
    # the first token is never predicted; the loss counts labels[1:]
    return sum(lab != _IGNORE for lab in encoded["labels"][1:])


# ----------------------------------------------------------------------------------------------- spectra


class _Accumulator:
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


def _subspace(svds: dict[str, Any], rank: int, spectrum: int) -> SafetySubspace:
    bases, energy, spectra = {}, {}, {}
    for name, (u, s, v) in svds.items():
        k = min(rank, s.numel())
        bases[name] = (u[:, :k].float().contiguous(), s[:k].float(), v[:, :k].float().contiguous())
        energy[name] = float((s.double() ** 2).sum())
        spectra[name] = s[:spectrum].float()
    return SafetySubspace(bases, energy, spectra, rank)


def _cer_by_module(svds: dict[str, tuple[Any, Tensor, Any]], max_k: int) -> dict[str, list[float]]:
    return {name: cer_curve(s, max_k) for name, (_u, s, _v) in svds.items()}


def _mean_curves(curves: Sequence[list[float]]) -> list[float]:
    return [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))] if curves else []


def _group_curves(per_module: dict[str, list[float]], key: Callable[[str], Any]) -> dict[str, list[float]]:
    groups: dict[str, list[list[float]]] = defaultdict(list)
    for name, curve in per_module.items():
        groups[str(key(name))].append(curve)
    return {g: _r(_mean_curves(c)) for g, c in groups.items()}


def _cer_summary(per_module_runs: Sequence[dict[str, list[float]]]) -> dict[str, Any]:
    """Curves averaged over modules (and over runs, e.g. the single-sample pairs), overall/by type/by layer."""
    merged: dict[str, list[float]] = {}
    for name in per_module_runs[0]:
        merged[name] = _mean_curves([run[name] for run in per_module_runs])
    mean = _mean_curves(list(merged.values()))
    return {
        "mean": _r(mean),
        "at": {str(k): round(mean[k - 1], 4) for k in SUMMARY_KS if k <= len(mean)},
        "by_type": _group_curves(merged, module_type),
        "by_layer": _group_curves(merged, lambda n: layer_of(n) if layer_of(n) is not None else "-"),
    }


def _r(values: Sequence[float], nd: int = 4) -> list[float]:
    return [round(float(v), nd) for v in values]


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "mean": round(statistics.fmean(values), 4),
        "median": round(statistics.median(values), 4),
        "std": round(statistics.pstdev(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "frac_negative": round(sum(v < 0 for v in values) / len(values), 4),
        "n": len(values),
    }


def _phi_stats(phi: dict[str, float]) -> dict[str, Any]:
    vals = list(phi.values())
    by_type: dict[str, list[float]] = defaultdict(list)
    for name, v in phi.items():
        by_type[module_type(name)].append(v)
    return {
        "mean": round(statistics.fmean(vals), 4),
        "min": round(min(vals), 4),
        "max": round(max(vals), 4),
        "by_type": {t: round(statistics.fmean(v), 4) for t, v in by_type.items()},
    }


# ---------------------------------------------------------------------------------------------- utility


def load_utility(
    tasks: Sequence[str],
    *,
    files: dict[str, str | Path] | None = None,
    shared_data: str | Path | None = None,
    n: int = 1000,
    seed: int = 0,
) -> dict[str, list[ChatSample]]:
    """Utility samples per task: ``files[name]`` (any format :func:`spf.data.samples.load_samples` reads, with
    responses) or the instruction-format builders of :mod:`spf.data.scenarios` over the shared data folder
    (``n`` samples of the training split, shuffled by ``seed``)."""
    files = dict(files or {})
    out: dict[str, list[ChatSample]] = {}
    root: Path | None = None
    for task in tasks:
        if task in files:
            samples = load_samples(files[task], require_response=True)
            out[task] = _pick(samples, n, seed)
            continue
        if task not in UTILITY_TASKS:
            raise ValueError(
                f"unknown utility task {task!r}: choose from {', '.join(UTILITY_TASKS)} "
                "or give its file with --utility-file NAME=PATH"
            )
        if root is None:
            from spf.data.locate import find_shared_data

            root = find_shared_data(shared_data)
            if root is None:
                raise DataError(
                    "public data folder ../shared/data not found: pass --shared-data, set SPF_SHARED_DATA "
                    "or give --utility-file NAME=PATH"
                )
        from spf.data.scenarios import build_scenario

        out[task] = build_scenario(task, shared_data=root, n=n, seed=seed)  # type: ignore[arg-type]
    for task, samples in files.items():
        if task not in out:
            out[task] = _pick(load_samples(samples, require_response=True), n, seed)
    return out


def _pick(samples: list[ChatSample], n: int, seed: int) -> list[ChatSample]:
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [samples[i] for i in order[:n]]


# --------------------------------------------------------------------------------------------- analysis


def run_analysis(
    model: nn.Module,
    tokenizer,
    safety: Sequence[ChatSample],
    utility: dict[str, Sequence[ChatSample]],
    *,
    n_utility: int = 100,
    batch_sizes: Sequence[int] = (1, 4, 16, 64),
    max_k: int = 50,
    rank: int = 8,
    n_singles: int = 8,
    modules: Sequence[str] | None = None,
    max_length: int = 512,
    tolerance: float = 0.1,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure insights I–III (see the module docstring); returns the JSON-ready result.

    ``safety``: (harmful prompt, refusal) pairs; sample 0 is "the" single safety sample (cosines), the first
    ``n_singles`` are the singles of the CER and overlap comparisons, the first n form the batch of size n.
    ``utility``: per task a pool of samples — the first ``n_utility`` give the cosines, the whole pool is the
    candidate set of the token matching (a larger pool matches better).
    """
    t_start = time.perf_counter()
    if not safety:
        raise ValueError("no safety samples")
    if any(s.response is None for s in safety):
        raise ValueError("every safety sample needs a response (the refusal)")
    for task, pool in utility.items():
        if not pool:
            raise ValueError(f"utility task {task!r} has no samples")
    if max_k < 1 or rank < 1 or n_singles < 1 or n_utility < 1:
        raise ValueError("max_k, rank, n_singles and n_utility must be ≥ 1")
    requested = sorted({int(b) for b in batch_sizes})
    if not requested or requested[0] < 1:
        raise ValueError(f"batch sizes must be ≥ 1, got {list(batch_sizes)}")
    sizes = sorted({min(b, len(safety)) for b in requested})
    if sizes != requested:
        logger.warning(
            "only %d safety samples: batch sizes %s used instead of %s", len(safety), sizes, requested
        )
    n_batch = sizes[-1]
    n_singles = min(n_singles, len(safety))
    names = list(modules) if modules is not None else select_modules(model)
    spectrum = max(max_k, rank)
    timings: dict[str, float] = {}

    enc_safety = [encode_sample(tokenizer, s, max_length=max_length) for s in safety]
    safety_len = [len(e["input_ids"]) for e in enc_safety]

    # ---- safety: singles (CER, overlap), nested batches (CER, overlap), sample 0's factors (cosine)
    t0 = time.perf_counter()
    acc = _Accumulator()
    single_cer: list[dict[str, list[float]]] = []
    single_subs: list[SafetySubspace] = []
    batch_subs: dict[int, SafetySubspace] = {}
    batch_cer: dict[int, dict[str, list[float]]] = {}
    batch_tokens: dict[int, dict[str, int]] = {}
    ref: Factors | None = None
    n_needed = max(n_batch, n_singles)
    for i in tqdm(range(n_needed), desc="safety gradients", disable=not progress):
        f = gradient_factors(model, enc_safety[i], names)
        if i == 0:
            ref = f
        single_svds = None
        if i < n_singles:
            single_svds = {n: factor_svd(f.d[n], f.x[n]) for n in names}
            single_cer.append(_cer_by_module(single_svds, max_k))
            single_subs.append(_subspace(single_svds, rank, spectrum))
        if i < n_batch:
            acc.add(f)
            if acc.count in sizes:
                # a batch of one is sample 0: its exact factored SVD is already there
                svds = single_svds if acc.count == 1 and single_svds is not None else acc.svds()
                batch_cer[acc.count] = _cer_by_module(svds, max_k)
                batch_subs[acc.count] = _subspace(svds, rank, spectrum)
                batch_tokens[acc.count] = {"tokens": acc.tokens, "supervised": acc.supervised}
    del acc
    assert ref is not None
    timings["safety"] = time.perf_counter() - t0

    cer: dict[str, Any] = {
        "finding": "",
        "ks": list(range(1, max_k + 1)),
        "single": {
            "n_pairs": n_singles,
            "safety": _cer_summary(single_cer),
            "tokens": {"safety": [{"tokens": safety_len[i]} for i in range(n_singles)]},
        },
        "batch": {
            str(n): {"n": n, "safety": _cer_summary([batch_cer[n]]), "tokens": {"safety": batch_tokens[n]}}
            for n in sizes
            if n > 1
        },
    }
    for i in range(n_singles):
        cer["single"]["tokens"]["safety"][i]["supervised"] = _n_supervised(enc_safety[i])

    cosine: dict[str, Any] = {
        "finding": "",
        "safety_sample": {
            "prompt": safety[0].prompt[:200],
            "tokens": ref.n_tokens,
            "supervised": ref.n_supervised,
            "loss": round(ref.loss, 4),
        },
        "tasks": {},
    }
    utility_subs: dict[str, SafetySubspace] = {}

    for task, pool in utility.items():
        t0 = time.perf_counter()
        enc_pool = [encode_sample(tokenizer, s, max_length=max_length) for s in pool]
        # ---- (II) cosines with the single safety sample, over the first n_utility samples
        overall: list[float] = []
        per_layer: dict[str, list[float]] = defaultdict(list)
        per_type: dict[str, list[float]] = defaultdict(list)
        module_neg: dict[str, int] = defaultdict(int)
        n_cos = min(n_utility, len(pool))
        for j in tqdm(range(n_cos), desc=f"cosine {task}", disable=not progress):
            f = gradient_factors(model, enc_pool[j], names)
            terms = factor_cosines(ref, f)
            del f
            overall.append(_cosine(terms.values()))
            layers: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
            types: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
            for name, t in terms.items():
                layer = layer_of(name)
                layers["-" if layer is None else str(layer)].append(t)
                types[module_type(name)].append(t)
                module_neg[name] += t[0] < 0
            for key, ts in layers.items():
                per_layer[key].append(_cosine(ts))
            for key, ts in types.items():
                per_type[key].append(_cosine(ts))
        if n_cos < n_utility:
            logger.warning("%s: only %d utility samples for the cosines (asked %d)", task, n_cos, n_utility)
        module_fracs = [v / n_cos for v in module_neg.values()]
        cosine["tasks"][task] = {
            "values": _r(overall),
            "overall": _stats(overall),
            "by_layer": {k: _stats(v) for k, v in sorted(per_layer.items(), key=_layer_sort)},
            "by_type": {k: _stats(v) for k, v in per_type.items()},
            "module_frac_negative_mean": round(statistics.fmean(module_fracs), 4) if module_fracs else None,
        }
        timings[f"cosine_{task}"] = time.perf_counter() - t0

        # ---- (I) like-for-like CER: one utility sample per safety sample, token counts matched
        t0 = time.perf_counter()
        pool_len = [len(e["input_ids"]) for e in enc_pool]
        matches = match_token_counts(safety_len[:n_needed], pool_len, tolerance=tolerance)
        acc = _Accumulator()
        u_single: list[dict[str, list[float]]] = []
        u_batch: dict[int, dict[str, list[float]]] = {}
        u_tokens: dict[int, dict[str, int]] = {}
        token_rows = []
        for i, match in enumerate(tqdm(matches, desc=f"CER {task}", disable=not progress)):
            enc = enc_pool[match.index]
            if match.how == "truncated":
                enc = truncate_encoded(enc, match.target)
            f = gradient_factors(model, enc, names)
            if i < n_singles:
                svds = {n: factor_svd(f.d[n], f.x[n]) for n in names}
                u_single.append(_cer_by_module(svds, max_k))
                token_rows.append(
                    {
                        "target": match.target,
                        "tokens": f.n_tokens,
                        "original": match.tokens,
                        "supervised": f.n_supervised,
                        "how": match.how,
                    }
                )
            if i < n_batch:
                acc.add(f)
                if acc.count in sizes and acc.count > 1:
                    svds = acc.svds(vectors=acc.count == n_batch)
                    u_batch[acc.count] = _cer_by_module(svds, max_k)
                    u_tokens[acc.count] = {"tokens": acc.tokens, "supervised": acc.supervised}
                    if acc.count == n_batch:
                        utility_subs[task] = _subspace(svds, rank, spectrum)
            del f
        del acc
        cer["single"][task] = _cer_summary(u_single)
        cer["single"]["tokens"][task] = token_rows
        cer["single"].setdefault("matching", {})[task] = {
            how: sum(m.how == how for m in matches[:n_singles]) for how in ("matched", "truncated", "shorter")
        }
        for n in sizes:
            if n > 1:
                cer["batch"][str(n)][task] = _cer_summary([u_batch[n]])
                cer["batch"][str(n)]["tokens"][task] = u_tokens[n]
                cer["batch"][str(n)].setdefault("matching", {})[task] = {
                    how: sum(m.how == how for m in matches[:n]) for how in ("matched", "truncated", "shorter")
                }
        timings[f"cer_{task}"] = time.perf_counter() - t0

    # ---- (III) overlaps
    t0 = time.perf_counter()
    dims = {name: (u.shape[0], v.shape[0]) for name, (u, _s, v) in single_subs[0].bases.items()}
    chance = statistics.fmean((min(rank, m) / m + min(rank, n) / n) / 2 for m, n in dims.values())
    vs_batch = {}
    for n in sizes:
        per_single = [subspace_overlap(s, batch_subs[n], k=rank) for s in single_subs]
        means = [statistics.fmean(p.values()) for p in per_single]
        vs_batch[str(n)] = {
            "n": n,
            "sample0": _phi_stats(per_single[0]),
            "singles_mean": round(statistics.fmean(means), 4),
            "singles_min": round(min(means), 4),
            "singles_max": round(max(means), 4),
            "tokens": batch_tokens[n]["tokens"],
        }
    pair_means = []
    for a in range(len(single_subs)):
        for b in range(a + 1, len(single_subs)):
            pair_means.append(
                statistics.fmean(subspace_overlap(single_subs[a], single_subs[b], k=rank).values())
            )
    overlap: dict[str, Any] = {
        "finding": "",
        "rank": rank,
        "chance": round(chance, 4),
        "batch_sizes": sizes,
        "vs_batch": vs_batch,
        "pairwise_singles": {
            "n_singles": len(single_subs),
            "n_pairs": len(pair_means),
            **(
                {
                    "mean": round(statistics.fmean(pair_means), 4),
                    "min": round(min(pair_means), 4),
                    "max": round(max(pair_means), 4),
                }
                if pair_means
                else {}
            ),
        },
        "safety_single_vs_utility_batch": {
            task: {"n": n_batch, **_phi_stats(subspace_overlap(single_subs[0], sub, k=rank))}
            for task, sub in utility_subs.items()
        },
    }
    timings["overlap"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": {
            **(meta or {}),
            "n_safety_available": len(safety),
            "n_utility": n_utility,
            "utility_pool": {task: len(pool) for task, pool in utility.items()},
            "batch_sizes_requested": requested,
            "batch_sizes": sizes,
            "max_k": max_k,
            "rank": rank,
            "n_singles": n_singles,
            "max_length": max_length,
            "tolerance": tolerance,
            "n_modules": len(names),
            "layers": sorted({layer_of(n) for n in names if layer_of(n) is not None}),
            "module_types": sorted({module_type(n) for n in names}),
        },
        "modules": names,
        "cer": cer,
        "cosine": cosine,
        "overlap": overlap,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }


def _layer_sort(item: tuple[str, Any]) -> tuple[int, str]:
    key = item[0]
    return (int(key), "") if key.isdigit() else (10**9, key)


# ----------------------------------------------------------------------------------------------- output


def plot_analysis(analysis: dict[str, Any], folder: str | Path) -> list[str]:
    """PNG figures of the three insights in ``folder``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    written: list[str] = []
    cer, cos, ov = analysis["cer"], analysis["cosine"], analysis["overlap"]
    tasks = list(cos["tasks"])
    ks = cer["ks"]
    colors = {"safety": "black", **{t: f"C{i}" for i, t in enumerate(tasks)}}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)

    # (I) CER spectra: singles, largest batch, CER@10 by module type
    batches = sorted(cer["batch"], key=int)
    panels = 3 if batches else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    groups = [("single", cer["single"], f"one sample each ({cer['single']['n_pairs']} pairs, mean)")]
    if batches:
        groups.append((batches[-1], cer["batch"][batches[-1]], f"batch gradient, n = {batches[-1]} each"))
    for ax, (_key, block, title) in zip(axes, groups, strict=False):
        for who in ["safety", *tasks]:
            if who in block:
                ax.plot(
                    ks, block[who]["mean"], label=who, color=colors[who], lw=2 if who == "safety" else 1.3
                )
        ax.set(title=title, xlabel="k", ylabel="CER(k), mean over modules", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
    k_ref = min(10, len(ks))
    ax = axes[-1]
    types = list(cer["single"]["safety"]["by_type"])
    width = 0.8 / (1 + len(tasks))
    for j, who in enumerate(["safety", *tasks]):
        vals = [cer["single"][who]["by_type"][t][k_ref - 1] for t in types]
        ax.bar([i + j * width for i in range(len(types))], vals, width, label=who, color=colors[who])
    ax.set_xticks([i + width * len(tasks) / 2 for i in range(len(types))], types, rotation=30)
    ax.set(title=f"CER@{k_ref} by module type (single samples)", ylim=(0, 1.25))
    ax.legend(fontsize=8, loc="upper center", ncol=1 + len(tasks))
    save(fig, "cer_spectra.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for who in ["safety", *tasks]:
        by_layer = cer["single"][who]["by_layer"]
        layers = sorted((k for k in by_layer if k.isdigit()), key=int)
        ax.plot([int(x) for x in layers], [by_layer[x][k_ref - 1] for x in layers], "o-", label=who,
                color=colors[who])  # fmt: skip
    ax.set(title=f"CER@{k_ref} per layer (single samples, like for like)", xlabel="layer", ylabel="CER")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "cer_layers.png")

    # (II) cosine distribution and per-layer fraction negative
    fig, ax = plt.subplots(figsize=(7, 4))
    every = [v for task in tasks for v in cos["tasks"][task]["values"]]
    lo, hi = min([*every, 0.0]), max([*every, 0.0])
    bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
    for task in tasks:
        ax.hist(cos["tasks"][task]["values"], bins=bins, alpha=0.45, label=task, color=colors[task])
    ax.axvline(0, color="black", lw=1)
    ax.set(title="cos(g_safety, g_utility), all chosen modules flattened", xlabel="cosine", ylabel="samples")
    ax.legend()
    save(fig, "cosine_hist.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for task in tasks:
        by_layer = cos["tasks"][task]["by_layer"]
        layers = sorted((k for k in by_layer if k.isdigit()), key=int)
        ax.plot([int(x) for x in layers], [by_layer[x]["frac_negative"] for x in layers], "o-", label=task,
                color=colors[task])  # fmt: skip
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(title="fraction of utility samples with cos < 0, per layer", xlabel="layer", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "cosine_layers.png")

    # (III) overlap vs batch size
    fig, ax = plt.subplots(figsize=(7, 4))
    ns = [ov["vs_batch"][str(n)]["n"] for n in ov["batch_sizes"]]
    rows = [ov["vs_batch"][str(n)] for n in ov["batch_sizes"]]
    ax.plot(
        ns, [r["sample0"]["mean"] for r in rows], "o-", color="black", label="sample 0 (mean over modules)"
    )
    ax.plot(ns, [r["singles_mean"] for r in rows], "s--", color="C3", label="mean over single samples")
    ax.fill_between(ns, [r["singles_min"] for r in rows], [r["singles_max"] for r in rows], color="C3",
                    alpha=0.15, label="min–max over single samples")  # fmt: skip
    if ov["pairwise_singles"].get("mean") is not None:
        ax.axhline(ov["pairwise_singles"]["mean"], color="C2", ls=":", label="pairwise between singles")
    ax.axhline(ov["chance"], color="grey", ls="--", lw=0.8, label="chance (random subspaces)")
    for i, (task, row) in enumerate(ov["safety_single_vs_utility_batch"].items()):
        ax.plot([row["n"]], [row["mean"]], "x", color=f"C{i}", label=f"sample 0 vs {task} batch")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set(title=f"overlap φ@{ov['rank']}: single-sample vs batch safety subspace", xlabel="batch size",
           ylabel="φ", ylim=(0, 1.02))  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "overlap.png")
    return written


def render_markdown(analysis: dict[str, Any], figures: str = ".") -> str:
    """A markdown summary of an analysis (numbers and figure links; figures relative to ``figures``)."""
    cfg, cer, cos, ov = analysis["config"], analysis["cer"], analysis["cosine"], analysis["overlap"]
    tasks = list(cos["tasks"])
    ks = [k for k in SUMMARY_KS if k <= len(cer["ks"])]

    def fig(name: str, alt: str) -> str:
        return f"![{alt}]({figures.rstrip('/')}/{name})"

    def finding(block: dict) -> list[str]:
        return [f"**Finding.** {block['finding']}", ""] if block.get("finding") else []

    out = [
        f"Model `{cfg.get('model', '?')}`, {cfg['n_modules']} modules "
        f"(layers {_ranges(cfg['layers'])}; {', '.join(cfg['module_types'])}), "
        f"safety samples from `{cfg.get('safety', '?')}` ({cfg['n_safety_available']} available).",
        "",
        "## I. CER spectra (like for like)",
        "",
        *finding(cer),
        "| gradient | samples | tokens (mean) | supervised (mean) | "
        + " | ".join(f"CER@{k}" for k in ks)
        + " |",
        "|---|---|---|---|" + "---|" * len(ks),
    ]
    single = cer["single"]
    for who in ["safety", *tasks]:
        rows = single["tokens"][who]
        tok = statistics.fmean(r["tokens"] for r in rows)
        sup = statistics.fmean(r["supervised"] for r in rows)
        at = single[who]["at"]
        out.append(
            f"| {who}, single | 1 (mean of {single['n_pairs']}) | {tok:.1f} | {sup:.1f} | "
            + " | ".join(f"{at[str(k)]:.3f}" for k in ks)
            + " |"
        )
    for n in sorted(cer["batch"], key=int):
        block = cer["batch"][n]
        for who in ["safety", *tasks]:
            t = block["tokens"][who]
            at = block[who]["at"]
            out.append(
                f"| {who}, batch | {n} | {t['tokens'] / int(n):.1f} | {t['supervised'] / int(n):.1f} | "
                + " | ".join(f"{at[str(k)]:.3f}" for k in ks)
                + " |"
            )
    matching = single.get("matching", {})
    if matching:
        out += [
            "",
            "Token matching of the single pairs (utility sample per safety sample): "
            + "; ".join(
                f"{t}: " + ", ".join(f"{v} {how}" for how, v in m.items() if v) for t, m in matching.items()
            )
            + f" (tolerance ±{cfg['tolerance']:.0%} or 2 tokens; truncated = cut to the safety sample's count).",
        ]
    out += ["", fig("cer_spectra.png", "CER spectra"), "", fig("cer_layers.png", "CER per layer"), ""]

    out += [
        "## II. Gradient conflict: cos(g_safety, g_utility)",
        "",
        *finding(cos),
        f"Safety sample: {cos['safety_sample']['tokens']} tokens "
        f"({cos['safety_sample']['supervised']} supervised), loss {cos['safety_sample']['loss']}.",
        "",
        "| task | n | mean | median | min | max | fraction < 0 | mean per-module fraction < 0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        s = cos["tasks"][task]["overall"]
        mf = cos["tasks"][task]["module_frac_negative_mean"]
        out.append(
            f"| {task} | {s['n']} | {s['mean']:.4f} | {s['median']:.4f} | {s['min']:.4f} | {s['max']:.4f} | "
            f"{s['frac_negative']:.2f} | {mf:.2f} |"
        )
    out += [
        "",
        fig("cosine_hist.png", "cosine histogram"),
        "",
        fig("cosine_layers.png", "cosine per layer"),
        "",
    ]

    out += [
        f"## III. Overlap φ@{ov['rank']} of single-sample and batch safety subspaces",
        "",
        *finding(ov),
        *(
            [
                f"Batch sizes {cfg['batch_sizes_requested']} were asked for; only {cfg['n_safety_available']} "
                f"safety samples were available, so {ov['batch_sizes']} were used.",
                "",
            ]
            if cfg.get("batch_sizes_requested", ov["batch_sizes"]) != ov["batch_sizes"]
            else []
        ),
        "| batch size | φ(sample 0, batch) | mean φ(single, batch) over singles | min | max |",
        "|---|---|---|---|---|",
    ]
    for n in ov["batch_sizes"]:
        r = ov["vs_batch"][str(n)]
        out.append(
            f"| {n} | {r['sample0']['mean']:.3f} | {r['singles_mean']:.3f} | {r['singles_min']:.3f} | "
            f"{r['singles_max']:.3f} |"
        )
    p = ov["pairwise_singles"]
    out += [""]
    if p.get("mean") is not None:
        out.append(
            f"Pairwise between {p['n_singles']} single samples ({p['n_pairs']} pairs): mean {p['mean']:.3f}, "
            f"min {p['min']:.3f}, max {p['max']:.3f}. Chance level (random subspaces): {ov['chance']:.3f}."
        )
    for task, r in ov["safety_single_vs_utility_batch"].items():
        out.append(f"Control — sample 0 vs the {task} batch subspace (n = {r['n']}): φ = {r['mean']:.3f}.")
    out += ["", fig("overlap.png", "overlap vs batch size"), ""]
    secs = analysis.get("seconds", {})
    if "total" in secs:
        out.append(f"Runtime: {secs['total']:.0f} s.")
    return "\n".join(out) + "\n"


def _ranges(values: Sequence[int]) -> str:
    if not values:
        return "—"
    if len(values) > 2:
        step = values[1] - values[0]
        if all(b - a == step for a, b in itertools.pairwise(values)):
            return f"{values[0]}–{values[-1]}" + (f" step {step}" if step != 1 else "")
    return ", ".join(map(str, values))


def write_analysis(analysis: dict[str, Any], out: str | Path) -> Path:
    """``out/analysis.json``, the PNG figures and ``out/summary.md``, built in a temporary folder beside
    ``out`` and renamed into place (an existing ``out`` is replaced only once the new one is complete)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        analysis["figures"] = plot_analysis(analysis, tmp)
        save_json(analysis, tmp / "analysis.json")
        (tmp / "summary.md").write_text(render_markdown(analysis))
    return out


# ------------------------------------------------------------------------------------------------- CLI


def add_analyze_arguments(p) -> None:
    """Options of ``spf analyze`` (``--threads``/``--device``/``-v`` come from the CLI's common options)."""
    p.add_argument("--model", help="smollm2-135m-instruct | local folder | hub id | tiny-llama (required)")
    p.add_argument("--safety", help="(harmful prompt, refusal) pairs, JSON/JSONL/CSV/TSV (required)")
    p.add_argument("--utility", default=",".join(UTILITY_TASKS), help="comma-separated tasks (shared data)")
    p.add_argument(
        "--utility-file", action="append", default=[], metavar="NAME=PATH", help="utility task from a file"
    )
    p.add_argument("--n-utility", type=int, default=100, help="utility samples per task for the cosines")
    p.add_argument("--match-pool", type=int, default=1000, help="candidates per task for token matching")
    p.add_argument("--batch-sizes", default="1,4,16,64", help="safety batch sizes (overlap and batch CER)")
    p.add_argument("--max-k", type=int, default=50, help="CER(k) for k = 1..max-k")
    p.add_argument("--rank", type=int, default=8, help="k of the overlap φ@k")
    p.add_argument("--n-singles", type=int, default=8, help="single safety samples compared")
    p.add_argument("--modules", nargs="*", default=None, help="module names or globs (default: all linears)")
    p.add_argument("--layer-stride", type=int, default=1, help="keep every N-th decoder layer")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--tolerance", type=float, default=0.1, help="relative token-count tolerance of matching")
    p.add_argument("--shared-data", default=None, help="public data folder (default: ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder: analysis.json, PNGs, summary.md (required)")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: expected positive integers, got {text!r}")
    return values


def main_analyze(args) -> int:
    """``spf analyze``: every input is checked before the model is loaded; nothing is written on error."""
    missing = [f"--{k}" for k in ("model", "safety", "out") if getattr(args, k) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or run the pipeline stage with --params FILE)")
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    for flag in ("n_utility", "match_pool", "max_k", "rank", "n_singles", "layer_stride", "max_length"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}")
    if not 0 <= args.tolerance < 1:
        raise ValueError(f"--tolerance must be in [0, 1), got {args.tolerance}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    files: dict[str, str | Path] = {}
    for spec in args.utility_file:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--utility-file: expected NAME=PATH, got {spec!r}")
        if not Path(path).is_file():
            raise DataError(f"--utility-file {name}: {path}: file not found")
        files[name.strip()] = path.strip()
    tasks = [t.strip() for t in args.utility.split(",") if t.strip()]
    if not tasks and not files:
        raise ValueError("no utility task: give --utility and/or --utility-file")
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("spf analyze draws its figures with matplotlib: pip install 'spf[analysis]'")
    safety = load_samples(args.safety, require_response=True)
    utility = load_utility(
        tasks,
        files=files,
        shared_data=args.shared_data,
        n=max(args.n_utility, args.match_pool),
        seed=args.seed,
    )
    if args.threads:
        torch.set_num_threads(args.threads)

    from spf.models import load_model

    model, tok = load_model(args.model, device=args.device)
    modules = select_modules(model, args.modules, layer_stride=args.layer_stride)
    logger.info(
        "analysing %d modules with %d safety samples, utility %s",
        len(modules),
        len(safety),
        {t: len(s) for t, s in utility.items()},
    )
    analysis = run_analysis(
        model,
        tok,
        safety,
        utility,
        n_utility=args.n_utility,
        batch_sizes=batch_sizes,
        max_k=args.max_k,
        rank=args.rank,
        n_singles=args.n_singles,
        modules=modules,
        max_length=args.max_length,
        tolerance=args.tolerance,
        meta={
            "model": args.model,
            "safety": str(args.safety),
            "utility_files": {k: str(v) for k, v in files.items()},
            "layer_stride": args.layer_stride,
            "module_patterns": args.modules,
            "threads": args.threads,
            "seed": args.seed,
            "match_pool": args.match_pool,
        },
    )
    write_analysis(analysis, out)
    cer, cos, ov = analysis["cer"], analysis["cosine"], analysis["overlap"]
    print("CER@10 single (like for like): " + ", ".join(
        f"{w} {cer['single'][w]['at'].get('10', float('nan')):.3f}" for w in ["safety", *cos["tasks"]]
    ))  # fmt: skip
    print("cos<0 fraction: " + ", ".join(
        f"{t} {v['overall']['frac_negative']:.2f}" for t, v in cos["tasks"].items()
    ))  # fmt: skip
    print("φ(sample 0, batch): " + ", ".join(
        f"n={n} {ov['vs_batch'][str(n)]['sample0']['mean']:.3f}" for n in ov["batch_sizes"]
    ))  # fmt: skip
    print(f"wrote {out}/analysis.json, summary.md and {len(analysis['figures'])} figures")
    return 0
