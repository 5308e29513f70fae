"""Paired statistics: known values, invariants, and the refusals of malformed input."""

from __future__ import annotations

import numpy as np
import pytest

from spf.eval.paired import holm, mcnemar, noninferiority, paired_bootstrap


def test_mcnemar_counts_discordant_pairs_only():
    a = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    b = [0, 0, 0, 0, 0, 0, 0, 1, 0, 1]
    r = mcnemar(a, b)
    assert (r["a_only"], r["b_only"]) == (7, 1)
    assert r["p_value"] == pytest.approx(0.0703125)  # 2 · P(X ≤ 1), X ~ Bin(8, 1/2)
    assert mcnemar(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError, match="same prompts"):
        mcnemar(a, b[:-1])


def test_bootstrap_is_paired_and_centred():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, size=(5, 300))
    same = paired_bootstrap(base, base)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0
    worse = base.copy()
    worse[:, :60] = 1  # up to 60 more harmful prompts in every seed
    r = paired_bootstrap(worse, base)
    assert r["diff"] > 0 and r["ci95"][0] > 0 and r["p_value"] < 0.01 and r["seeds"] == 5
    assert paired_bootstrap(base, worse)["diff"] == pytest.approx(-r["diff"])


def test_a_single_base_row_pairs_with_every_seed():
    base = np.array([[0, 1, 0, 0, 1, 0, 0, 0]])
    seeds = np.repeat(base, 5, axis=0)
    assert paired_bootstrap(seeds, base)["diff"] == 0.0
    with pytest.raises(ValueError, match="0/1"):
        paired_bootstrap(seeds * 2, base)


def test_noninferiority_margin():
    rng = np.random.default_rng(1)
    base = (rng.random((1, 400)) < 0.1).astype(int)
    close = base.copy()
    close[0, :4] = 1  # at most +1 point
    far = base.copy()
    far[0, :80] = 1  # up to +20 points
    assert noninferiority(close, base, 0.05)["non_inferior"]
    assert not noninferiority(far, base, 0.05)["non_inferior"]
    with pytest.raises(ValueError, match="margin"):
        noninferiority(close, base, 0.0)


def test_holm_step_down():
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adj == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert holm({}) == {}
