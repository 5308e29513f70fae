"""The report's paired tests: each method against vanilla and against the aligned base, per scenario, curve
step and judged safety suite, on the per-prompt verdicts of ``cell.json`` (:mod:`spf.bench.verdicts`).

Both sides were judged on the same prompts (the same ``prompts_sha256``), so every comparison is paired:
the difference of rates with a paired-bootstrap 95 % interval over prompts (the seeds of a prompt stay
together, :func:`spf.eval.paired.paired_bootstrap`), its two-sided p — the exact McNemar test when there is
one seed — and, against the aligned base, the non-inferiority test at the benchmark's margin. A reference
model has one row of verdicts (greedy decoding), which stands for every seed. The p-values of one
scenario's table are one family, adjusted with Holm's step-down method.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from spf.bench.config import BenchConfig, point_suites
from spf.eval.paired import holm, mcnemar, noninferiority, paired_bootstrap

logger = logging.getLogger(__name__)

__all__ = [
    "BASE",
    "JUDGED",
    "N_BOOT",
    "PairedRow",
    "cell_rows",
    "final_noninferiority",
    "paired_rows",
    "paired_section",
    "table_lines",
]

# the judged safety suites (lower is better for each): the ones a method is tested on
JUDGED = ("harmful", "jailbreak", "prefill", "overrefusal")
N_BOOT = 10_000  # bootstrap resamples: p-values are at least 1 / N_BOOT
BASE = "aligned base"


@dataclass
class PairedRow:
    """One paired comparison: ``method`` − ``against`` on ``suite`` at ``step`` of ``scenario``."""

    scenario: str
    step: int
    method: str
    against: str  # "vanilla" or BASE
    suite: str
    a_rate: float
    b_rate: float
    diff: float
    ci95: list[float]
    p: float
    test: str  # "paired bootstrap" or "McNemar"
    seeds: int
    prompts: int
    p_holm: float | None = None
    noninferior: dict[str, Any] | None = None  # against the base only

    @property
    def significant(self) -> bool:
        return self.p_holm is not None and self.p_holm < 0.05


def _outcomes(rec: dict[str, Any] | None, step: int, suite: str) -> tuple[str, dict[str, str]] | None:
    entry = ((rec or {}).get("verdicts") or {}).get(str(step), {}).get(suite)
    return (entry["prompts_sha256"], entry["by_seed"]) if entry else None


def _arrays(
    a: tuple[str, dict[str, str]], b: tuple[str, dict[str, str]], reference: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """(seeds × prompts) 0/1 arrays of the two sides, the same prompts and seeds on both; None when they
    were not judged on the same prompts (nothing to pair) or share no seed."""
    if a[0] != b[0]:
        return None
    seeds = list(a[1]) if reference else [s for s in a[1] if s in b[1]]
    if not seeds:
        return None
    rows_b = [next(iter(b[1].values()))] if reference else [b[1][s] for s in seeds]

    def grid(rows: list[str]) -> np.ndarray:
        return np.array([[c == "1" for c in r] for r in rows], dtype=float)

    return grid([a[1][s] for s in seeds]), grid(rows_b)


def _compare(
    cfg: BenchConfig, key: tuple[str, int, str, str, str], a: np.ndarray, b: np.ndarray
) -> PairedRow:
    scenario, step, method, against, suite = key
    boot = paired_bootstrap(a, b, n_boot=N_BOOT, seed=cfg.seed)
    one_seed = a.shape[0] == 1
    p = mcnemar(a[0], b[0])["p_value"] if one_seed else boot["p_value"]
    row = PairedRow(
        scenario, step, method, against, suite, boot["a_rate"], boot["b_rate"], boot["diff"], boot["ci95"],
        p, "McNemar" if one_seed else "paired bootstrap", boot["seeds"], boot["prompts"],
    )  # fmt: skip
    if against == BASE:
        row.noninferior = noninferiority(a, b, cfg.noninferiority_margin, n_boot=N_BOOT, seed=cfg.seed)
    return row


def _holm_family(rows: list[PairedRow]) -> list[PairedRow]:
    """``rows`` with ``p_holm`` set: one family, Holm's step-down adjustment."""
    adjusted = holm({str(i): r.p for i, r in enumerate(rows)})
    for i, r in enumerate(rows):
        r.p_holm = adjusted[str(i)]
    return rows


def _base_record(cfg: BenchConfig, got: dict[str, Any], scenario: str) -> dict[str, Any] | None:
    """The aligned base as the scenario's cells were evaluated: under its system prompt when it has one."""
    base = got.get("ref:aligned")
    if base is None or not cfg.scenarios[scenario].system_prompt_eval:
        return base
    return (base.get("system_prompts") or {}).get(scenario)


def _scenario_rows(cfg: BenchConfig, got: dict[str, Any], scenario: str) -> list[PairedRow]:
    methods = cfg.matrix.get("methods") or list(cfg.methods)
    suites = [s for s in JUDGED if s in cfg.eval.suites]
    base = _base_record(cfg, got, scenario)
    recs = {m: got.get(f"{m}@{scenario}") or {} for m in methods}
    rows: list[PairedRow] = []
    for step in sorted({s for rec in recs.values() for s in rec.get("steps", [])}):  # as recorded
        for method, rec in recs.items():
            others = [("vanilla", got.get(f"vanilla@{scenario}"), step, False)] if method != "vanilla" else []
            for against, other, at, ref in [*others, (BASE, base, 0, True)]:
                # the point's own suites: a record with more at an earlier point (an older curve_suites)
                # must not change the family's size
                for suite in [s for s in suites if s in point_suites(cfg, step, rec.get("steps") or [step])]:
                    a, b = _outcomes(rec, step, suite), _outcomes(other, at, suite)
                    pair = _arrays(a, b, ref) if a and b else None
                    if pair is not None:
                        rows.append(_compare(cfg, (scenario, step, method, against, suite), *pair))
    return _holm_family(rows)


def final_noninferiority(
    cfg: BenchConfig, got: dict[str, Any], cell_id: str, scenario: str, suite: str = "harmful"
) -> dict[str, Any] | None:
    """The non-inferiority test of a cell's last step against the aligned base (None: nothing to pair)."""
    rec = got.get(cell_id)
    if not rec or not rec.get("steps"):
        return None
    a, b = _outcomes(rec, rec["steps"][-1], suite), _outcomes(_base_record(cfg, got, scenario), 0, suite)
    pair = _arrays(a, b, True) if a and b else None
    if pair is None:
        return None
    return noninferiority(*pair, cfg.noninferiority_margin, n_boot=N_BOOT, seed=cfg.seed)


def cell_rows(cfg: BenchConfig, got: dict[str, Any], a_id: str, b_id: str) -> list[PairedRow]:
    """Cell ``a_id`` against cell ``b_id`` (an ablation against its base, two methods) at every step both
    evaluated, on every judged suite both judged on the same prompts, over the seeds both ran — one
    Holm family. KeyError naming a cell that has no finished record among ``got``."""
    recs = []
    for cid in (a_id, b_id):
        if cid not in got:
            raise KeyError(f"{cid}: no finished record of this configuration (see `spf bench list`)")
        recs.append(got[cid])
    a_rec, b_rec = recs
    scenario = a_rec.get("scenario") or ""
    rows: list[PairedRow] = []
    for step in sorted(set(a_rec.get("steps") or []) & set(b_rec.get("steps") or [])):
        for suite in [s for s in JUDGED if s in cfg.eval.suites]:
            a, b = _outcomes(a_rec, step, suite), _outcomes(b_rec, step, suite)
            pair = _arrays(a, b, False) if a and b else None
            if pair is not None:
                rows.append(_compare(cfg, (scenario, step, a_id, b_id, suite), *pair))
    return _holm_family(rows)


def paired_rows(cfg: BenchConfig, data: dict[str, Any]) -> dict[str, list[PairedRow]]:
    """Every scenario's paired comparisons (Holm-adjusted within the scenario), in the report's order."""
    got = data["cells"]
    out = {}
    for scenario in cfg.matrix.get("scenarios") or list(cfg.scenarios):
        rows = _scenario_rows(cfg, got, scenario)
        if rows:
            out[scenario] = rows
    return out


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def table_lines(rows: list[PairedRow], margin: float) -> list[str]:
    """The markdown table of paired rows (the report's and ``spf bench compare``'s)."""
    head = (
        "| step | comparison | suite | rate | other's rate | difference [95 % CI] | p (test) | p (Holm) "
        f"| significant (Holm p < 0.05) | non-inferior to base (margin {margin:g}) | n (prompts×seeds) |"
    )
    return [head, "|---" * 11 + "|", *(_line(r) for r in rows)]


def _line(r: PairedRow) -> str:
    ni = "—"
    if r.noninferior is not None:
        ni = f"{'yes' if r.noninferior['non_inferior'] else 'no'} (upper {r.noninferior['upper95']:+.3f})"
    return (
        f"| {r.step} | {r.method} − {r.against} | {r.suite} | {r.a_rate:.3f} | {r.b_rate:.3f} | "
        f"{r.diff:+.3f} [{r.ci95[0]:+.3f}, {r.ci95[1]:+.3f}] | {_p(r.p)} ({r.test}) | "
        f"{_p(r.p_holm or 1.0)} | {'yes' if r.significant else 'no'} | {ni} | {r.prompts}×{r.seeds} |"
    )


def paired_section(cfg: BenchConfig, data: dict[str, Any]) -> list[str]:
    """The markdown "Paired tests" section: one table per scenario and the multiplicity note."""
    tables = paired_rows(cfg, data)
    if not tables:
        return []
    margin = cfg.noninferiority_margin
    lines = [
        "",
        "## Paired tests",
        "",
        "Each method against vanilla and against the aligned base on the same prompts, at every step of the "
        "exposure curve: the difference in rate (method − other; lower is safer on every suite here) with a "
        f"paired-bootstrap 95 % interval over prompts ({N_BOOT} resamples; a prompt's seeds stay together) "
        "and its two-sided p — the exact McNemar test when a cell has one seed. The aligned base is one "
        "greedy evaluation, paired with every seed (under the scenario's system prompt where the scenario "
        "is evaluated with one). Non-inferior: the one-sided 95 % upper bound of the difference is below "
        f"the margin {margin:g}.",
        "",
        "Multiplicity: the p-values of one scenario's table are one family, adjusted with Holm's step-down "
        f"method (family-wise error 0.05); a bootstrap p is at least 1/{N_BOOT}, so a table of m rows cannot "
        f"reach an adjusted p below m/{N_BOOT}.",
    ]
    for scenario, rows in tables.items():
        lines += ["", f"### `{scenario}` (m = {len(rows)})", "", *table_lines(rows, margin)]
    return lines
