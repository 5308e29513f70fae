"""``spf bench report``: the finished cells → ``bench.json``, the markdown report and its plots.

Every number in the report is read from the cells' ``cell.json`` files (collected into ``bench.json``),
so a report can be rebuilt at any time without re-running anything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from spf.bench.compare import final_noninferiority, paired_section
from spf.bench.config import BenchConfig, cell_dir, cells, record_is_current, seed_list
from spf.bench.keep import Keep
from spf.bench.plots import draw_report_plots
from spf.bench.verdicts import CI_METHOD
from spf.io import atomic_path, save_json
from spf.training.config import BASELINE_METHODS

logger = logging.getLogger(__name__)

__all__ = ["acceptance_lines", "collect", "render_report", "report_folder", "write_report"]


def _share_ids(record: dict[str, Any], table: dict[str, list[str]]) -> None:
    """Move each verdict entry's prompt list into ``table`` (by its SHA-256): every cell and step of one
    protocol holds the same lists, which bench.json would otherwise repeat hundreds of times."""
    for step in (record.get("verdicts") or {}).values():
        for entry in step.values():
            if "ids" in entry:
                table[entry["prompts_sha256"]] = entry.pop("ids")
    for sub in (record.get("system_prompts") or {}).values():
        _share_ids(sub, table)


def collect(cfg: BenchConfig) -> dict[str, Any]:
    """Every finished cell's record (by cell id), plus the side-by-side cost JSON when configured. The
    verdicts' prompt lists are kept once, in ``prompt_ids`` (SHA-256 → prompts)."""
    found = {}
    ids: dict[str, list[str]] = {}
    keep = None if cfg.keep is None else Keep(cfg.keep, cfg.work_dir, cfg.aligned)
    for c in cells(cfg):
        path = cell_dir(cfg, c) / "cell.json"
        if path.is_file():
            record = json.loads(path.read_text())
        else:  # a fresh work folder: the kept copy, if any
            record = None if keep is None else keep.load_json(path)
        if record is not None and not record_is_current(cfg, c, record):
            # e.g. a cell of fewer seeds than this run asks for: its numbers would pass for these seeds'
            logger.warning("%s: %s is not of this configuration (seeds, curve, suites): left out", c.id, path)
        elif record is not None:
            found[c.id] = record
            _share_ids(found[c.id], ids)
    data: dict[str, Any] = {
        "name": cfg.name,
        "config": cfg.source,
        "aligned": cfg.aligned,
        "seeds": seed_list(cfg),
        "file_seeds": cfg.file_seeds,  # the file's seeds when this is an interim run of a subset, else None
        "cells": found,
        "prompt_ids": ids,
    }
    if cfg.overhead and Path(cfg.overhead).is_file():
        data["overhead"] = json.loads(Path(cfg.overhead).read_text())
    return data


def _fmt(s: dict[str, Any] | None) -> str:
    if not s:
        return "—"
    per = s.get("n_per_seed")
    n = f"{per}×{s['n'] // per}" if per else str(s["n"])  # prompts × seeds
    return f"{s['rate']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}] n={n}"


_COLS = [
    ("harmful", "harmful rate ↓"),
    ("jailbreak", "jailbreak success ↓"),
    ("prefill", "prefill success ↓"),
    ("overrefusal", "over-refusal ↓"),
    ("utility", "utility ↑"),
]


def _row(name: str, rec: dict[str, Any] | None, vanilla: dict[str, Any] | None, suites: list[str]) -> str:
    if rec is None:
        return f"| {name} | " + " | ".join("not run" for _ in suites) + " | | | |"
    cols = [_fmt(rec["suites"].get(s)) for s in suites]
    t = _step_seconds(rec)
    tv = _step_seconds(vanilla)
    ratio = f"{t:.2f} s ({t / tv:.2f}×)" if t and tv else (f"{t:.2f} s" if t else "—")
    mem = rec.get("train_peak_cuda_mb") or rec.get("train_peak_rss_mb")
    rise = (rec.get("train") or {}).get("safety_loss_sample_rise")
    return (
        f"| {name} | "
        + " | ".join(cols)
        + f" | {ratio} | {f'{mem:.0f} MB' if mem else '—'} | {f'{rise:+.3f}' if rise is not None else '—'} |"
    )


def _rate(rec: dict[str, Any] | None, suite: str) -> float | None:
    return ((rec or {}).get("suites", {}).get(suite) or {}).get("rate")


def _step_seconds(rec: dict[str, Any] | None) -> float | None:
    return ((rec or {}).get("train") or {}).get("mean_step_seconds")


def _verdict(rise: float) -> str:
    # the acceptance criterion: SPF keeps the harmful rate within 5 points of the aligned base
    return "met" if rise <= 0.05 else "NOT met"


# ------------------------------------------------------------------------------------- acceptance checks


def _scenario_checks(cfg: BenchConfig, got: dict[str, Any], base: float | None) -> list[str]:
    """Per harmful-mix scenario: SPF's harmful rate against the aligned base, then against each baseline."""
    out: list[str] = []
    for name, spec in cfg.scenarios.items():
        if spec.kind != "harmful-mix":
            continue
        spf = got.get(f"spf@{name}")
        h = _rate(spf, "harmful")
        if h is None or base is None:
            continue
        ni = final_noninferiority(cfg, got, f"spf@{name}", name)
        paired = (
            f"; paired non-inferiority at margin {ni['margin']:g}: "
            f"{'met' if ni['non_inferior'] else 'NOT met'} (one-sided 95 % upper bound {ni['upper95']:+.3f})"
            if ni
            else ""
        )
        out.append(
            f"- `{name}`: SPF harmful rate {h:.2f} vs aligned base {base:.2f} ({h - base:+.2f}; within 5 points: "
            f"{_verdict(h - base)}{paired}); vanilla "
            f"{_rate(got.get(f'vanilla@{name}'), 'harmful') or float('nan'):.2f}."
        )
        u = _rate(spf, "utility")
        for other in BASELINE_METHODS:
            rec = got.get(f"{other}@{name}")
            ho, uo = _rate(rec, "harmful"), _rate(rec, "utility")
            if ho is None or u is None or uo is None:
                continue
            better = "lower" if h < ho else ("equal" if h == ho else "higher")
            out.append(
                f"  - vs {other}: harmful {h:.2f} vs {ho:.2f} (SPF {better}); utility {u:.3f} vs {uo:.3f} "
                f"(SPF {'≥' if u >= uo else '<'})."
            )
    return out


def _ablation_checks(cfg: BenchConfig, got: dict[str, Any], base: float | None) -> list[str]:
    out: list[str] = []
    for a in cfg.ablations:
        rec = got.get(f"ablation:{a.name}")
        scenario = a.base.split("@")[1]
        h, u = _rate(rec, "harmful"), _rate(rec, "utility")
        uv = _rate(got.get(f"vanilla@{scenario}"), "utility")
        if h is None or base is None or cfg.scenarios[scenario].kind != "harmful-mix":
            continue
        util = f", utility {u / uv:.0%} of vanilla's" if u is not None and uv else ""
        out.append(
            f"- ablation `{a.name}` on `{scenario}`: harmful {h:.2f} ({h - base:+.2f} vs the aligned base; "
            f"within 5 points: {_verdict(h - base)}){util}."
        )
    return out


def _cost_checks(cfg: BenchConfig, data: dict[str, Any]) -> list[str]:
    """The ≤ 1.05× step-time target from the side-by-side run, then the indicative in-benchmark ratios."""
    out: list[str] = []
    cost = data.get("overhead")
    if cost:
        # the amortised (mean) ratio when recorded: a re-estimation every T steps is in the mean only
        ratios = {c: v.get("mean_ratio", v["step_ratio"]) for c, v in cost["configs"].items()}
        for c, r in ratios.items():
            if c.startswith("spf-"):
                out.append(
                    f"- cost, side by side (one run, `{cost['command']}`): {c} {r:.2f}× vanilla step time "
                    f"(≤ 1.05×: {'met' if r <= 1.05 else 'NOT met'})"
                    + (f"; SafeGrad {ratios['safegrad']:.2f}×." if "safegrad" in ratios else ".")
                )
    got = data["cells"]
    for name in cfg.scenarios:
        t = _step_seconds(got.get(f"spf@{name}"))
        tv = _step_seconds(got.get(f"vanilla@{name}"))
        ts = _step_seconds(got.get(f"safegrad@{name}"))
        if t and tv:
            extra = f", SafeGrad {ts / tv:.2f}×" if ts else ""
            out.append(
                f"- step time on `{name}` (indicative, parallel lanes): SPF {t / tv:.2f}× vanilla{extra}."
            )
    return out


def acceptance_lines(cfg: BenchConfig, data: dict[str, Any]) -> list[str]:
    """Issue #5's comparisons, as sentences computed from the cells (so they change when the numbers do)."""
    got = data["cells"]
    base = _rate(got.get("ref:aligned"), "harmful")
    return [*_scenario_checks(cfg, got, base), *_ablation_checks(cfg, got, base), *_cost_checks(cfg, data)]


# ---------------------------------------------------------------------------------------------- markdown


def _table_head(suites: list[str]) -> tuple[str, str]:
    head = (
        "| model | "
        + " | ".join(t for s, t in _COLS if s in suites)
        + " | step time (× vanilla) | peak memory (train) | sample refusal-loss rise |"
    )
    return head, "|---" * (len(suites) + 4) + "|"


def _intro(cfg: BenchConfig) -> list[str]:
    seeds, e = seed_list(cfg), cfg.eval
    interim, flag = [], ""
    if cfg.file_seeds is not None:
        flag = f" --seeds {' '.join(map(str, seeds))}"
        interim = [
            f"**Interim result: {len(seeds)} of the {len(cfg.file_seeds)} training seeds the benchmark file "
            f"asks for** ({', '.join(map(str, cfg.file_seeds))}); the other seeds are still to run.",
            "",
        ]
    return [
        f"# Benchmark results: {cfg.name}",
        "",
        *interim,
        f"Produced by `spf bench run {cfg.source}{flag} && spf bench report {cfg.source}{flag}`; every number "
        "below is read "
        f"from `{cfg.work_dir}/cells/*/cell.json` (collected in `{report_folder(cfg)}/bench.json`). "
        f"Aligned base `{cfg.aligned}`; every training cell is run with {len(seeds)} training seed(s) "
        f"({', '.join(map(str, seeds))}: data order and LoRA init) and evaluated at every step of its "
        f"scenario's exposure curve; the tables show the last step. Evaluation: the protocol's "
        f"`{e.split}` prompts (harmful: AdvBench, XSTest-unsafe and our held-out set; over-refusal: "
        f"XSTest-safe and ours; none in any training set — checked before training), at most "
        f"{_limits(e.limits)} per source, the same prompts for every cell and seed; judge `{e.judge}`. "
        "Rates are pooled over seeds, n = prompts × seeds, with a 95 % Wilson interval whose sample size is "
        f"the effective one of outcomes clustered by prompt ({CI_METHOD}: between the prompts alone and "
        "prompts × seeds). Step time is the mean optimizer step of the cell (over seeds) and its ratio to "
        f"vanilla on the same scenario in the same benchmark run ({cfg.lanes} parallel lane(s) on a shared "
        "machine: indicative; the side-by-side cost is in docs/results/overhead.md).",
    ]


def _limits(limits: dict[str, int | None]) -> str:
    return ", ".join(f"{s} {'all' if n is None else n}" for s, n in limits.items())


def _result_tables(cfg: BenchConfig, got: dict[str, Any], suites: list[str]) -> list[str]:
    """The reference rows, one table per scenario (methods as rows), and the ablations."""
    head, sep = _table_head(suites)
    lines = ["", "## Reference models", "", head, sep]
    for c in cells(cfg):
        if c.group == "reference":
            lines.append(_row(c.id.split(":", 1)[1], got.get(c.id), None, suites))
    methods = cfg.matrix.get("methods") or list(cfg.methods)
    for scenario in cfg.matrix.get("scenarios") or list(cfg.scenarios):
        spec = cfg.scenarios[scenario]
        desc = spec.kind + (f" p={spec.p}" if spec.kind == "harmful-mix" else "")
        if spec.steps_multiplier != 1:
            desc += f", {spec.steps_multiplier:g}× steps"
        if spec.eval_steps:
            desc += f", evaluated at steps {', '.join(map(str, spec.eval_steps))}"
        if spec.system_prompt_eval:
            desc += ", under its training system prompt"
        lines += ["", f"## Scenario `{scenario}` ({desc})", "", head, sep]
        vanilla = got.get(f"vanilla@{scenario}")
        for m in methods:
            lines.append(_row(m, got.get(f"{m}@{scenario}"), vanilla, suites))
    if cfg.ablations:
        lines += ["", "## SPF ablations", "", head.replace("| model |", "| ablation (base) |"), sep]
        for a in cfg.ablations:
            name = f"{a.name} ({a.base}){' — ' + a.note if a.note else ''}"
            vanilla = got.get("vanilla@" + a.base.split("@")[1])
            lines.append(_row(name, got.get(f"ablation:{a.name}"), vanilla, suites))
    return lines


def _cost_section(cfg: BenchConfig, cost: dict[str, Any] | None) -> list[str]:
    if not cost:
        return []
    lines = [
        "",
        "## Cost, side by side",
        "",
        f"`{cost['command']}` ({cost['model']}, batch {cost['batch_size']}, {cost['steps']} steps × "
        f"{cost['rounds']} rounds, {cost['threads']} thread(s), each configuration in its own process, "
        f"interleaved; finished {cost['finished']}; JSON: `{cfg.overhead}`). Steps 2–{cost['steps']} of each "
        "run; the checks use the mean (a re-estimation every T steps is in the mean, not the median).",
        "",
        "| configuration | median step | × vanilla | mean step (amortised) | × vanilla | peak RSS | × vanilla |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, v in cost["configs"].items():
        mean = f"{v['mean_step_s']:.3f} s | {v['mean_ratio']:.2f}" if "mean_ratio" in v else "— | —"
        lines.append(
            f"| {c} | {v['median_step_s']:.3f} s | {v['step_ratio']:.2f} | {mean} | {v['peak_rss_mb']:.0f} MB "
            f"| {v['rss_ratio']:.2f} |"
        )
    if cost.get("refresh_median_s"):
        lines += [
            "",
            f"One re-estimation (the single sample's forward + backward + factorisation): "
            f"{cost['refresh_median_s']:.3f} s.",
        ]
    return lines


_SEE_ALSO = [
    "",
    "## See also",
    "",
    "- the methods and their papers: [baselines.md](baselines.md)",
    "- insights I–III (`spf analyze`): [results/insights.md](results/insights.md)",
    "- SPF and SafeGrad cost measured side by side: [results/overhead.md](results/overhead.md)",
    "- the SPF settings measured through the pipeline itself (SST-2, 40 steps; where the margin subspace "
    "did not protect and the shipped params.yaml comes from): [pipeline.md](pipeline.md#measured)",
]


def render_report(cfg: BenchConfig, data: dict[str, Any], plots: dict[str, str]) -> str:
    """The markdown report: tables, cost, acceptance checks, plots (``plots``: title → relative path)."""
    suites = [s for s, _ in _COLS if s in cfg.eval.suites]
    got = data["cells"]
    lines = [*_intro(cfg), *_result_tables(cfg, got, suites), *paired_section(cfg, data)]
    lines += _cost_section(cfg, data.get("overhead"))
    checks = acceptance_lines(cfg, data)
    if checks:
        lines += [
            "",
            "## Checks against the acceptance criteria (computed from the cells above)",
            "",
            *checks,
        ]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{k}]({v})" for k, v in plots.items()]
    lines += _SEE_ALSO
    missing = [c.id for c in cells(cfg) if c.id not in got]
    if missing:
        lines += ["", f"Not run yet ({len(missing)}): " + ", ".join(f"`{m}`" for m in missing)]
    return "\n".join(lines) + "\n"


def report_folder(cfg: BenchConfig) -> Path:
    """Where the report's JSON and plots go: docs/results.md → docs/results/bench/, X.md → X/."""
    folder = Path(cfg.report).with_suffix("")
    return folder / "bench" if folder.name == "results" else folder


def write_report(cfg: BenchConfig) -> Path:
    """``bench.json`` and the plots in :func:`report_folder`, then the markdown at ``cfg.report``."""
    data = collect(cfg)
    folder = report_folder(cfg)
    save_json(data, folder / "bench.json", tracked_ok=True)  # reports are committed on purpose
    text = render_report(cfg, data, draw_report_plots(cfg, data, folder))
    with atomic_path(cfg.report, tracked_ok=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(cfg.report)
