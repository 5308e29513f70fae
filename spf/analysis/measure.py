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

Modules: :mod:`spf.analysis.factors` (gradient factors, Gram algebra), :mod:`spf.analysis.matching` (token
matching), :mod:`spf.analysis.insights` (the three measurements), :mod:`spf.analysis.report` (markdown and
PNGs). This module picks the modules and samples and sequences the measurements: :func:`run_analysis`
returns a plain dict (all numbers); :func:`write_analysis` writes ``analysis.json``, PNG figures and
``summary.md`` (:func:`render_markdown`) into a folder, atomically.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from spf.analysis.factors import (
    Factors,
    cer_curve,
    factor_cosines,
    factor_svd,
    gradient_factors,
    layer_of,
    module_type,
)
from spf.analysis.insights import (
    Plan,
    SafetyGradients,
    UtilityCER,
    cer_summary,
    measure_cer,
    measure_conflict,
    measure_overlap,
    measure_safety,
)
from spf.analysis.matching import TokenMatch, match_token_counts, n_supervised, truncate_encoded
from spf.analysis.report import plot_analysis, render_markdown
from spf.data.samples import ChatSample, DataError, encode_sample, load_samples
from spf.eval.vocab import DEFAULT_UTILITY_TASKS
from spf.io import atomic_dir, save_json
from spf.models import default_target_modules

logger = logging.getLogger(__name__)

# the names of the pre-split module stay importable from here (the pipeline's analyze stage, the tests)
__all__ = [
    "UTILITY_TASKS",
    "AnalyzeSettings",
    "Factors",
    "TokenMatch",
    "analysis_summary",
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
# the public utility tasks, which spf.data.scenarios builds from the shared data folder
UTILITY_TASKS: tuple[str, ...] = DEFAULT_UTILITY_TASKS


# ------------------------------------------------------------------------------------------- selection


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


@dataclass(frozen=True)
class AnalyzeSettings:
    """The knobs of one analysis (``spf analyze`` flags, ``params.yaml``'s ``analyze:``); see :func:`run_analysis`."""

    n_utility: int = 100  # utility samples per task for the cosines
    batch_sizes: Sequence[int] = (1, 4, 16, 64)  # safety batch sizes (overlap and batch CER)
    max_k: int = 50  # CER(k) for k = 1..max_k
    rank: int = 8  # k of the overlap φ@k
    n_singles: int = 8  # single safety samples compared
    modules: Sequence[str] | None = None  # None = every decoder linear
    max_length: int = 512
    tolerance: float = 0.1  # relative token-count tolerance of the matching
    progress: bool = True


def _plan(
    model: nn.Module, safety: Sequence[ChatSample], utility: dict, s: AnalyzeSettings
) -> tuple[Plan, list[int]]:
    """Check the inputs and resolve the settings against them → (plan, the batch sizes asked for)."""
    if not safety:
        raise ValueError("no safety samples")
    if any(x.response is None for x in safety):
        raise ValueError("every safety sample needs a response (the refusal)")
    for task, pool in utility.items():
        if not pool:
            raise ValueError(f"utility task {task!r} has no samples")
    if s.max_k < 1 or s.rank < 1 or s.n_singles < 1 or s.n_utility < 1:
        raise ValueError("max_k, rank, n_singles and n_utility must be ≥ 1")
    requested = sorted({int(b) for b in s.batch_sizes})
    if not requested or requested[0] < 1:
        raise ValueError(f"batch sizes must be ≥ 1, got {list(s.batch_sizes)}")
    sizes = sorted({min(b, len(safety)) for b in requested})
    if sizes != requested:
        logger.warning(
            "only %d safety samples: batch sizes %s used instead of %s", len(safety), sizes, requested
        )
    names = list(s.modules) if s.modules is not None else select_modules(model)
    plan = Plan(
        modules=names,
        sizes=sizes,
        n_singles=min(s.n_singles, len(safety)),
        max_k=s.max_k,
        rank=s.rank,
        n_utility=s.n_utility,
        tolerance=s.tolerance,
        progress=s.progress,
    )
    return plan, requested


def _safety_cer(sg: SafetyGradients, encoded: Sequence[dict], plan: Plan) -> dict[str, Any]:
    """Insight I's block with the safety side filled in; each utility task adds itself (:func:`_add_task_cer`)."""
    tokens = [
        {"tokens": len(encoded[i]["input_ids"]), "supervised": n_supervised(encoded[i])}
        for i in range(plan.n_singles)
    ]
    return {
        "finding": "",
        "ks": list(range(1, plan.max_k + 1)),
        "single": {
            "n_pairs": plan.n_singles,
            "safety": cer_summary(sg.single_cer),
            "tokens": {"safety": tokens},
        },
        "batch": {
            str(n): {
                "n": n,
                "safety": cer_summary([sg.batch_cer[n]]),
                "tokens": {"safety": sg.batch_tokens[n]},
            }
            for n in plan.sizes
            if n > 1
        },
    }


def _add_task_cer(cer: dict[str, Any], task: str, u: UtilityCER) -> None:
    cer["single"][task] = u.single
    cer["single"]["tokens"][task] = u.tokens
    cer["single"].setdefault("matching", {})[task] = u.matching
    for n, block in u.batch.items():
        cer["batch"][str(n)][task] = block["summary"]
        cer["batch"][str(n)]["tokens"][task] = block["tokens"]
        cer["batch"][str(n)].setdefault("matching", {})[task] = block["matching"]


def _config(safety, utility, s: AnalyzeSettings, plan: Plan, requested: list[int], meta) -> dict[str, Any]:
    names = plan.modules
    return {
        **(meta or {}),
        "n_safety_available": len(safety),
        "n_utility": s.n_utility,
        "utility_pool": {task: len(pool) for task, pool in utility.items()},
        "batch_sizes_requested": requested,
        "batch_sizes": plan.sizes,
        "max_k": s.max_k,
        "rank": s.rank,
        "n_singles": plan.n_singles,
        "max_length": s.max_length,
        "tolerance": s.tolerance,
        "n_modules": len(names),
        "layers": sorted({layer_of(n) for n in names if layer_of(n) is not None}),
        "module_types": sorted({module_type(n) for n in names}),
    }


def run_analysis(
    model: nn.Module,
    tokenizer,
    safety: Sequence[ChatSample],
    utility: dict[str, Sequence[ChatSample]],
    settings: AnalyzeSettings | None = None,
    *,
    meta: dict[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Measure insights I–III (see the module docstring); returns the JSON-ready result.

    ``safety``: (harmful prompt, refusal) pairs; sample 0 is "the" single safety sample (cosines), the first
    ``n_singles`` are the singles of the CER and overlap comparisons, the first n form the batch of size n.
    ``utility``: per task a pool of samples — the first ``n_utility`` give the cosines, the whole pool is the
    candidate set of the token matching (a larger pool matches better). ``settings`` (default
    :class:`AnalyzeSettings`) may be given field by field as keywords instead (``n_utility=…``), or both:
    a keyword overrides the settings' field.
    """
    t_start = time.perf_counter()
    s = dataclasses.replace(settings or AnalyzeSettings(), **overrides)
    plan, requested = _plan(model, safety, utility, s)
    timings: dict[str, float] = {}
    enc_safety = [encode_sample(tokenizer, x, max_length=s.max_length) for x in safety]
    safety_len = [len(e["input_ids"]) for e in enc_safety]

    t0 = time.perf_counter()
    sg = measure_safety(model, enc_safety, plan)
    timings["safety"] = time.perf_counter() - t0
    cer = _safety_cer(sg, enc_safety, plan)
    ref = sg.ref
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
    utility_subs = {}
    for task, pool in utility.items():
        t0 = time.perf_counter()
        enc_pool = [encode_sample(tokenizer, x, max_length=s.max_length) for x in pool]
        cosine["tasks"][task] = measure_conflict(model, ref, enc_pool, task, plan)
        timings[f"cosine_{task}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        u = measure_cer(model, enc_pool, safety_len, task, plan)
        _add_task_cer(cer, task, u)
        if u.subspace is not None:
            utility_subs[task] = u.subspace
        timings[f"cer_{task}"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    overlap = measure_overlap(sg, utility_subs, plan)
    timings["overlap"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": _config(safety, utility, s, plan, requested, meta),
        "modules": plan.modules,
        "cer": cer,
        "cosine": cosine,
        "overlap": overlap,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }


# ----------------------------------------------------------------------------------------------- output


def write_analysis(analysis: dict[str, Any], out: str | Path) -> Path:
    """``out/analysis.json``, the PNG figures and ``out/summary.md``, built in a temporary folder beside
    ``out`` and renamed into place (an existing ``out`` is replaced only once the new one is complete)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        analysis["figures"] = plot_analysis(analysis, tmp)
        save_json(analysis, tmp / "analysis.json")
        (tmp / "summary.md").write_text(render_markdown(analysis))
    return out


def analysis_summary(analysis: dict[str, Any]) -> list[str]:
    """The three headline lines ``spf analyze`` prints: CER@10 of the singles, cos < 0 fractions, φ vs batch."""
    cer, cos, ov = analysis["cer"], analysis["cosine"], analysis["overlap"]
    return [
        "CER@10 single (like for like): "
        + ", ".join(
            f"{w} {cer['single'][w]['at'].get('10', float('nan')):.3f}" for w in ["safety", *cos["tasks"]]
        ),
        "cos<0 fraction: "
        + ", ".join(f"{t} {v['overall']['frac_negative']:.2f}" for t, v in cos["tasks"].items()),
        "φ(sample 0, batch): "
        + ", ".join(f"n={n} {ov['vs_batch'][str(n)]['sample0']['mean']:.3f}" for n in ov["batch_sizes"]),
    ]
