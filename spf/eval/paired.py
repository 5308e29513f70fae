"""Paired comparisons of two methods judged on the same prompts (and seeds): the tests the report uses.

Outcomes are 0/1 arrays shaped ``(seeds, prompts)`` (one row per seed; a single seed is a 1-row array), the
same prompts in the same order for both methods, so every comparison is paired:

* :func:`mcnemar` — the exact McNemar test on one seed's discordant pairs (scipy's binomial test);
* :func:`paired_bootstrap` — the difference of rates with a 95 % interval and a two-sided p-value from
  resampling *prompts* (the unit that varies between studies; seeds stay paired with their prompts, so the
  interval covers both prompt and seed variation without treating seed × prompt cells as independent);
* :func:`noninferiority` — "within ``margin`` of the base": the one-sided 95 % upper bound of the paired
  difference is below the margin;
* :func:`holm` — Holm's step-down adjustment over a family of p-values (the multiplicity note).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest

__all__ = ["holm", "mcnemar", "noninferiority", "paired_bootstrap"]


def _as_2d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name}: expected a (seeds, prompts) array of 0/1 outcomes, got shape {a.shape}")
    if not np.isin(a, (0.0, 1.0)).all():
        raise ValueError(f"{name}: outcomes must be 0/1")
    return a


def _paired(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a2, b2 = _as_2d(a, "a"), _as_2d(b, "b")
    if a2.shape[1] != b2.shape[1]:
        raise ValueError(f"a and b must be judged on the same prompts: {a2.shape[1]} vs {b2.shape[1]}")
    if b2.shape[0] == 1 and a2.shape[0] > 1:
        b2 = np.repeat(b2, a2.shape[0], axis=0)  # one base model (no seeds) against a seeded method
    if a2.shape != b2.shape:
        raise ValueError(f"a and b need the same seeds × prompts: {a2.shape} vs {b2.shape}")
    return a2, b2


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test of one seed: ``a_only`` prompts where only a is 1, ``b_only`` where only b is."""
    a1, b1 = _paired(a, b)
    if a1.shape[0] != 1:
        raise ValueError("mcnemar takes one seed; use paired_bootstrap for several")
    a_only = int(((a1 == 1) & (b1 == 0)).sum())
    b_only = int(((a1 == 0) & (b1 == 1)).sum())
    n = a_only + b_only
    p = 1.0 if n == 0 else float(binomtest(a_only, n, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p, "n_prompts": int(a1.shape[1])}


def paired_bootstrap(a: Any, b: Any, *, n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Rate difference a − b with a 95 % percentile interval and two-sided p, resampling prompts."""
    a2, b2 = _paired(a, b)
    per_prompt = (a2 - b2).mean(0)  # each prompt's difference averaged over seeds
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, per_prompt.size, size=(n_boot, per_prompt.size))
    boots = per_prompt[idx].mean(1)
    diff = float(per_prompt.mean())
    # two-sided p: how often the resampled difference, centred on 0, is at least as extreme as observed
    centred = boots - boots.mean()
    p = float((np.abs(centred) >= abs(diff) - 1e-12).mean()) if diff else 1.0
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {
        "a_rate": float(a2.mean()),
        "b_rate": float(b2.mean()),
        "diff": diff,
        "ci95": [float(lo), float(hi)],
        "p_value": max(p, 1.0 / n_boot),
        "seeds": int(a2.shape[0]),
        "prompts": int(a2.shape[1]),
    }


def noninferiority(
    method: Any, base: Any, margin: float, *, n_boot: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """Is ``method``'s rate (lower is better: harmful) within ``margin`` of ``base``'s? Non-inferior when the
    one-sided 95 % upper bound of the paired difference (method − base) is below ``margin``."""
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    a2, b2 = _paired(method, base)
    per_prompt = (a2 - b2).mean(0)
    rng = np.random.default_rng(seed)
    boots = per_prompt[rng.integers(0, per_prompt.size, size=(n_boot, per_prompt.size))].mean(1)
    upper = float(np.percentile(boots, 95.0))
    return {
        "diff": float(per_prompt.mean()),
        "upper95": upper,
        "margin": margin,
        "non_inferior": upper < margin,
        "seeds": int(a2.shape[0]),
        "prompts": int(a2.shape[1]),
    }


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (family-wise error control; scipy ships only the Benjamini-Hochberg FDR)."""
    order = sorted(p_values, key=lambda k: p_values[k])
    m = len(order)
    out: dict[str, float] = {}
    running = 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        out[key] = running
    return {k: out[k] for k in p_values}
