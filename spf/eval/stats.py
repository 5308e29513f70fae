"""Counts, rates and 95% Wilson intervals: the numbers every suite reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["SuiteResult", "count_true", "rate_dict", "wilson_interval"]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (``(0, 1)`` when n = 0: nothing is known);
    scipy's ``binomtest(k, n).proportion_ci(method="wilson")`` at the confidence level of ``z``.

    Preferred over the normal approximation because it stays inside [0, 1] and is not degenerate at k = 0
    or k = n, which is exactly where safety rates live.
    """
    from scipy.stats import binomtest, norm

    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=2 * norm.cdf(z) - 1, method="wilson")
    # Clamp float round-off (e.g. -1e-17 at k = 0).
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


@dataclass
class SuiteResult:
    """One suite's outcome: ``k`` of ``n`` items counted (harmful, refused or correct)."""

    name: str
    n: int
    k: int
    rate: float
    ci_low: float
    ci_high: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_counts(cls, name: str, k: int, n: int, **extra: Any) -> SuiteResult:
        if n < 1:
            raise ValueError(f"suite {name!r} has no items")
        low, high = wilson_interval(k, n)
        return cls(name, n, k, k / n, low, high, dict(extra))

    def to_dict(self) -> dict[str, Any]:
        # Flat: the contract keys first, then the suite-specific extras beside them.
        return {
            "n": self.n,
            "k": self.k,
            "rate": self.rate,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            **self.extra,
        }


def rate_dict(k: int, n: int) -> dict[str, Any]:
    """``{n, k, rate, ci_low, ci_high}`` for a sub-group (a template, a category); rate 0 when n = 0."""
    low, high = wilson_interval(k, n)
    return {"n": n, "k": k, "rate": k / n if n else 0.0, "ci_low": low, "ci_high": high}


def count_true(records: list[dict[str, Any]], key: str) -> int:
    """How many records have a truthy ``key`` (refused, harmful, correct)."""
    return sum(bool(r[key]) for r in records)
