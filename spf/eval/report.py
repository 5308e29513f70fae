"""An evaluation's ``results.json`` rendered: as a terminal table, and as the flat metrics of the gate and MLflow."""

from __future__ import annotations

from typing import Any

__all__ = ["flat_metrics", "format_table"]


def _note(name: str, s: dict[str, Any]) -> str:
    note = ""
    if "refusal_rate" in s:
        note = f"refused {s['refusal_rate']:.1%}"
    if name == "jailbreak":
        worst = s["templates"][s["worst_template"]]["rate"]
        note += f"; {s['n_templates']} templates; worst {s['worst_template']} {worst:.1%}; cells {s['cells']['rate']:.1%}"
    if "worst_source" in s:
        w = s["worst_source"]
        parts = ", ".join(f"{k} {v['rate']:.1%}/{v['n']}" for k, v in s["by_source"].items())
        note += f"{'; ' if note else ''}by source: {parts}; worst {w}"
    if "keyword" in s:
        note += f"{'; ' if note else ''}keyword judge {s['keyword']['harmful']['rate']:.1%} harmful"
    if "fallback_for" in s:
        note += f"{'; ' if note else ''}fallback for {s['fallback_for']}"
    return note


def format_table(results: dict[str, Any]) -> str:
    """A short terminal table: suite, metric, n, rate and 95% CI, with a note per suite."""
    lines = [f"{'suite':<16}{'metric':<26}{'n':>6}{'rate':>8}  {'95% CI':<15} note"]
    for name, s in results.get("suites", {}).items():
        if name == "utility" and "entry" in s:
            continue  # a copy of the headline utility task
        ci = f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
        lines.append(
            f"{name:<16}{s.get('metric', ''):<26}{s['n']:>6}{s['rate']:>8.3f}  {ci:<15} {_note(name, s)}".rstrip()
        )
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"{name:<16}skipped: {reason}")
    head = f"model {results.get('model')}"
    if results.get("adapter"):
        head += f" + adapter {results['adapter']}"
    if results.get("judge"):
        head += f"; judge {results['judge']}"
    return "\n".join([head, *lines])


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``results.json`` of ``spf eval`` → the flat metrics the gate and MLflow use."""
    suites = results.get("suites", {})
    names = {
        "harmful": "harmful_rate",
        "overrefusal": "overrefusal_rate",
        "jailbreak": "jailbreak_rate",
        "prefill": "prefill_rate",
        "utility": "utility",
    }
    out: dict[str, float] = {}
    for suite, key in names.items():
        if suite in suites:
            s = suites[suite]
            # With several prompt sources the headline is the worst source's rate, not the pooled mean: a
            # model safe on one distribution and unsafe on another must not pass on the average.
            head = s["by_source"][s["worst_source"]] if s.get("worst_source") else s
            out[key] = float(head["rate"])
            out[f"{key}_ci_low"] = float(head["ci_low"])
            out[f"{key}_ci_high"] = float(head["ci_high"])
            out[f"{key}_n"] = float(head["n"])
            if s.get("worst_source"):
                out[f"{key}_pooled"] = float(s["rate"])
                for source, r in s["by_source"].items():
                    out[f"{key}_{source.replace('-', '_')}"] = float(r["rate"])
                    out[f"{key}_{source.replace('-', '_')}_n"] = float(r["n"])
    for name, s in suites.items():
        if name.startswith("utility.") and "rate" in s:
            out[name.replace(".", "_")] = float(s["rate"])
    base = (results.get("base") or {}).get("utility")
    if base:  # the aligned base's utility on the same rows (the gate's min_utility_gain)
        for field in ("rate", "ci_low", "ci_high", "n"):
            out["base_utility" if field == "rate" else f"base_utility_{field}"] = float(base[field])
    return out
