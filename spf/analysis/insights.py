"""The three measurements of ``spf analyze`` (see :mod:`spf.analysis.measure`) and their JSON summaries.

:func:`measure_safety` takes every safety gradient once (singles, nested batches, sample 0 for the
cosines); :func:`measure_conflict` is insight II for one utility task, :func:`measure_cer` the
like-for-like half of insight I for one task, :func:`measure_overlap` insight III. Each returns plain
numbers (or the subspaces the next step needs), so :func:`spf.analysis.measure.run_analysis` only
sequences them.
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from spf.analysis.factors import (
    Accumulator,
    Factors,
    cer_curve,
    cosine,
    factor_cosines,
    factor_svd,
    gradient_factors,
    layer_of,
    module_type,
    subspace_from_svds,
)
from spf.analysis.matching import match_token_counts, truncate_encoded
from spf.core.subspace import SafetySubspace, subspace_overlap

logger = logging.getLogger(__name__)

__all__ = [
    "SUMMARY_KS",
    "Plan",
    "SafetyGradients",
    "UtilityCER",
    "cer_summary",
    "measure_cer",
    "measure_conflict",
    "measure_overlap",
    "measure_safety",
]

SUMMARY_KS: tuple[int, ...] = (1, 5, 10, 20)
_HOWS = ("matched", "truncated", "shorter")

Encoded = dict[str, list[int]]
Curves = dict[str, list[float]]  # module name → [CER(1), …, CER(max_k)]


@dataclass(frozen=True)
class Plan:
    """What one analysis measures, resolved against the inputs (batch sizes capped at the safety set)."""

    modules: list[str]
    sizes: list[int]  # safety batch sizes used, ascending
    n_singles: int
    max_k: int
    rank: int
    n_utility: int
    tolerance: float
    progress: bool = True

    @property
    def n_batch(self) -> int:
        return self.sizes[-1]

    @property
    def n_needed(self) -> int:
        """Safety samples whose gradient is taken: the largest batch and every single."""
        return max(self.n_batch, self.n_singles)

    @property
    def spectrum(self) -> int:
        return max(self.max_k, self.rank)


# --------------------------------------------------------------------------------------------- summaries


def _r(values: Sequence[float], nd: int = 4) -> list[float]:
    return [round(float(v), nd) for v in values]


def _mean_curves(curves: Sequence[list[float]]) -> list[float]:
    return [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))] if curves else []


def _group_curves(per_module: Curves, key: Callable[[str], Any]) -> Curves:
    groups: dict[str, list[list[float]]] = defaultdict(list)
    for name, curve in per_module.items():
        groups[str(key(name))].append(curve)
    return {g: _r(_mean_curves(c)) for g, c in groups.items()}


def cer_summary(per_module_runs: Sequence[Curves]) -> dict[str, Any]:
    """Curves averaged over modules (and over runs, e.g. the single-sample pairs), overall/by type/by layer."""
    merged: Curves = {}
    for name in per_module_runs[0]:
        merged[name] = _mean_curves([run[name] for run in per_module_runs])
    mean = _mean_curves(list(merged.values()))
    return {
        "mean": _r(mean),
        "at": {str(k): round(mean[k - 1], 4) for k in SUMMARY_KS if k <= len(mean)},
        "by_type": _group_curves(merged, module_type),
        "by_layer": _group_curves(merged, lambda n: layer_of(n) if layer_of(n) is not None else "-"),
    }


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


def _layer_sort(item: tuple[str, Any]) -> tuple[int, str]:
    key = item[0]
    return (int(key), "") if key.isdigit() else (10**9, key)


def _cer_by_module(svds: dict[str, tuple[Any, Tensor, Any]], max_k: int) -> Curves:
    return {name: cer_curve(s, max_k) for name, (_u, s, _v) in svds.items()}


def _single_svds(f: Factors, names: Sequence[str]) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    return {n: factor_svd(f.d[n], f.x[n]) for n in names}


def _batch_tokens(acc: Accumulator) -> dict[str, int]:
    return {"tokens": acc.tokens, "supervised": acc.supervised}


# ------------------------------------------------------------------------------------ (I, III) safety side


@dataclass
class SafetyGradients:
    """Everything taken from the safety samples' gradients, once."""

    ref: Factors  # sample 0: "the" single safety sample of the cosines
    single_cer: list[Curves] = field(default_factory=list)
    single_subs: list[SafetySubspace] = field(default_factory=list)
    batch_cer: dict[int, Curves] = field(default_factory=dict)
    batch_subs: dict[int, SafetySubspace] = field(default_factory=dict)
    batch_tokens: dict[int, dict[str, int]] = field(default_factory=dict)


def measure_safety(model: nn.Module, encoded: Sequence[Encoded], plan: Plan) -> SafetyGradients:
    """Singles (CER, overlap), the nested batches 1..n (CER, overlap) and sample 0's factors (cosine)."""
    acc = Accumulator()
    out: SafetyGradients | None = None
    for i in tqdm(range(plan.n_needed), desc="safety gradients", disable=not plan.progress):
        f = gradient_factors(model, encoded[i], plan.modules)
        if out is None:
            out = SafetyGradients(ref=f)
        single_svds = None
        if i < plan.n_singles:
            single_svds = _single_svds(f, plan.modules)
            out.single_cer.append(_cer_by_module(single_svds, plan.max_k))
            out.single_subs.append(subspace_from_svds(single_svds, plan.rank, plan.spectrum))
        if i < plan.n_batch:
            acc.add(f)
            if acc.count in plan.sizes:
                # a batch of one is sample 0: its exact factored SVD is already there
                svds = single_svds if acc.count == 1 and single_svds is not None else acc.svds()
                out.batch_cer[acc.count] = _cer_by_module(svds, plan.max_k)
                out.batch_subs[acc.count] = subspace_from_svds(svds, plan.rank, plan.spectrum)
                out.batch_tokens[acc.count] = _batch_tokens(acc)
    if out is None:
        raise ValueError("no safety samples")
    return out


# ------------------------------------------------------------------------------------ (II) gradient conflict


def _grouped_cosines(
    terms: dict[str, tuple[float, float, float]],
) -> tuple[dict[str, float], dict[str, float]]:
    """One utility sample's cosine with the safety sample per layer and per module type."""
    layers: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    types: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for name, t in terms.items():
        layer = layer_of(name)
        layers["-" if layer is None else str(layer)].append(t)
        types[module_type(name)].append(t)
    return {k: cosine(ts) for k, ts in layers.items()}, {k: cosine(ts) for k, ts in types.items()}


def measure_conflict(
    model: nn.Module, ref: Factors, pool: Sequence[Encoded], task: str, plan: Plan
) -> dict[str, Any]:
    """``cos(g_safety, g_utility)`` of the safety sample ``ref`` with the first ``n_utility`` of ``pool``:
    all modules flattened, per layer, per module type, and how often each module's inner product is < 0."""
    overall: list[float] = []
    per_layer: dict[str, list[float]] = defaultdict(list)
    per_type: dict[str, list[float]] = defaultdict(list)
    module_neg: dict[str, int] = defaultdict(int)
    n_cos = min(plan.n_utility, len(pool))
    for j in tqdm(range(n_cos), desc=f"cosine {task}", disable=not plan.progress):
        terms = factor_cosines(ref, gradient_factors(model, pool[j], plan.modules))
        overall.append(cosine(terms.values()))
        by_layer, by_type = _grouped_cosines(terms)
        for key, v in by_layer.items():
            per_layer[key].append(v)
        for key, v in by_type.items():
            per_type[key].append(v)
        for name, t in terms.items():
            module_neg[name] += t[0] < 0
    if n_cos < plan.n_utility:
        logger.warning("%s: only %d utility samples for the cosines (asked %d)", task, n_cos, plan.n_utility)
    module_fracs = [v / n_cos for v in module_neg.values()]
    return {
        "values": _r(overall),
        "overall": _stats(overall),
        "by_layer": {k: _stats(v) for k, v in sorted(per_layer.items(), key=_layer_sort)},
        "by_type": {k: _stats(v) for k, v in per_type.items()},
        "module_frac_negative_mean": round(statistics.fmean(module_fracs), 4) if module_fracs else None,
    }


# ------------------------------------------------------------------------------- (I) like-for-like CER


@dataclass
class UtilityCER:
    """One task's CER next to the safety samples: singles, nested batches, and the largest batch's subspace."""

    single: dict[str, Any]
    tokens: list[dict[str, Any]]
    matching: dict[str, int]
    batch: dict[int, dict[str, Any]]  # n → {"summary", "tokens", "matching"}
    subspace: SafetySubspace | None  # the batch of n_batch (None when the largest batch is 1)


def _match_counts(matches: Sequence[Any]) -> dict[str, int]:
    return {how: sum(m.how == how for m in matches) for how in _HOWS}


def measure_cer(
    model: nn.Module, pool: Sequence[Encoded], safety_len: Sequence[int], task: str, plan: Plan
) -> UtilityCER:
    """One utility sample per safety sample, of (nearly) its token count (truncated when none is close):
    the singles' and the nested batches' CER, like for like with :func:`measure_safety`'s."""
    pool_len = [len(e["input_ids"]) for e in pool]
    matches = match_token_counts(safety_len[: plan.n_needed], pool_len, tolerance=plan.tolerance)
    acc = Accumulator()
    singles: list[Curves] = []
    token_rows: list[dict[str, Any]] = []
    batch: dict[int, dict[str, Any]] = {}
    subspace = None
    for i, match in enumerate(tqdm(matches, desc=f"CER {task}", disable=not plan.progress)):
        enc = pool[match.index]
        if match.how == "truncated":
            enc = truncate_encoded(enc, match.target)
        f = gradient_factors(model, enc, plan.modules)
        if i < plan.n_singles:
            singles.append(_cer_by_module(_single_svds(f, plan.modules), plan.max_k))
            token_rows.append(
                {
                    "target": match.target,
                    "tokens": f.n_tokens,
                    "original": match.tokens,
                    "supervised": f.n_supervised,
                    "how": match.how,
                }
            )
        if i < plan.n_batch:
            acc.add(f)
            if acc.count in plan.sizes and acc.count > 1:
                # singular vectors only for the largest batch: its subspace is the overlap control
                svds = acc.svds(vectors=acc.count == plan.n_batch)
                batch[acc.count] = {
                    "summary": cer_summary([_cer_by_module(svds, plan.max_k)]),
                    "tokens": _batch_tokens(acc),
                    "matching": _match_counts(matches[: acc.count]),
                }
                if acc.count == plan.n_batch:
                    subspace = subspace_from_svds(svds, plan.rank, plan.spectrum)
        del f
    single = cer_summary(singles)
    return UtilityCER(single, token_rows, _match_counts(matches[: plan.n_singles]), batch, subspace)


# ------------------------------------------------------------------------------- (III) subspace stability


def _pairwise(subs: Sequence[SafetySubspace], rank: int) -> dict[str, Any]:
    pair_means = [
        statistics.fmean(subspace_overlap(subs[a], subs[b], k=rank).values())
        for a in range(len(subs))
        for b in range(a + 1, len(subs))
    ]
    out: dict[str, Any] = {"n_singles": len(subs), "n_pairs": len(pair_means)}
    if pair_means:
        out.update(
            mean=round(statistics.fmean(pair_means), 4),
            min=round(min(pair_means), 4),
            max=round(max(pair_means), 4),
        )
    return out


def measure_overlap(
    safety: SafetyGradients, utility_subs: dict[str, SafetySubspace], plan: Plan
) -> dict[str, Any]:
    """φ@rank of each single safety subspace with each batch subspace, between singles, and (a control)
    of sample 0 with each utility task's batch subspace; ``chance`` is φ of random subspaces."""
    rank, singles = plan.rank, safety.single_subs
    dims = {name: (u.shape[0], v.shape[0]) for name, (u, _s, v) in singles[0].bases.items()}
    chance = statistics.fmean((min(rank, m) / m + min(rank, n) / n) / 2 for m, n in dims.values())
    vs_batch = {}
    for n in plan.sizes:
        per_single = [subspace_overlap(s, safety.batch_subs[n], k=rank) for s in singles]
        means = [statistics.fmean(p.values()) for p in per_single]
        vs_batch[str(n)] = {
            "n": n,
            "sample0": _phi_stats(per_single[0]),
            "singles_mean": round(statistics.fmean(means), 4),
            "singles_min": round(min(means), 4),
            "singles_max": round(max(means), 4),
            "tokens": safety.batch_tokens[n]["tokens"],
        }
    return {
        "finding": "",
        "rank": rank,
        "chance": round(chance, 4),
        "batch_sizes": plan.sizes,
        "vs_batch": vs_batch,
        "pairwise_singles": _pairwise(singles, rank),
        "safety_single_vs_utility_batch": {
            task: {"n": plan.n_batch, **_phi_stats(subspace_overlap(singles[0], sub, k=rank))}
            for task, sub in utility_subs.items()
        },
    }
