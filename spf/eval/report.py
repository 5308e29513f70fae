"""Terminal rendering of an evaluation's ``results.json``."""

from __future__ import annotations

from typing import Any

__all__ = ["format_table"]


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
