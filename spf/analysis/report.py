"""``spf analyze`` output: the markdown summary and the PNG figures of an analysis dict (numbers only).

Both read only the dict :func:`spf.analysis.measure.run_analysis` returns (``analysis.json``), so a report
can be redrawn from the JSON without the model.
"""

from __future__ import annotations

import itertools
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spf.analysis.insights import SUMMARY_KS

logger = logging.getLogger(__name__)

__all__ = ["plot_analysis", "render_markdown"]


# ----------------------------------------------------------------------------------------------- figures


@dataclass
class _Canvas:
    """What every figure shares: pyplot, the output folder, one colour per gradient source."""

    plt: Any
    folder: Path
    tasks: list[str]
    written: list[str] = field(default_factory=list)

    @property
    def colors(self) -> dict[str, str]:
        return {"safety": "black", **{t: f"C{i}" for i, t in enumerate(self.tasks)}}

    def save(self, fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(self.folder / name, dpi=110)
        self.plt.close(fig)
        self.written.append(name)


def _digit_layers(by_layer: dict[str, Any]) -> list[str]:
    return sorted((k for k in by_layer if k.isdigit()), key=int)


def _plot_cer_spectra(c: _Canvas, cer: dict[str, Any]) -> None:
    """(I) CER spectra: singles, the largest batch, CER@10 by module type."""
    ks, tasks, colors = cer["ks"], c.tasks, c.colors
    batches = sorted(cer["batch"], key=int)
    panels = 3 if batches else 2
    fig, axes = c.plt.subplots(1, panels, figsize=(5 * panels, 4))
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
    c.save(fig, "cer_spectra.png")


def _plot_cer_layers(c: _Canvas, cer: dict[str, Any]) -> None:
    k_ref = min(10, len(cer["ks"]))
    fig, ax = c.plt.subplots(figsize=(7, 4))
    for who in ["safety", *c.tasks]:
        by_layer = cer["single"][who]["by_layer"]
        layers = _digit_layers(by_layer)
        ax.plot([int(x) for x in layers], [by_layer[x][k_ref - 1] for x in layers], "o-", label=who,
                color=c.colors[who])  # fmt: skip
    ax.set(title=f"CER@{k_ref} per layer (single samples, like for like)", xlabel="layer", ylabel="CER")
    ax.grid(alpha=0.3)
    ax.legend()
    c.save(fig, "cer_layers.png")


def _plot_cosines(c: _Canvas, cos: dict[str, Any]) -> None:
    """(II) the cosine distribution, and the per-layer fraction of negative cosines."""
    fig, ax = c.plt.subplots(figsize=(7, 4))
    every = [v for task in c.tasks for v in cos["tasks"][task]["values"]]
    lo, hi = min([*every, 0.0]), max([*every, 0.0])
    bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
    for task in c.tasks:
        ax.hist(cos["tasks"][task]["values"], bins=bins, alpha=0.45, label=task, color=c.colors[task])
    ax.axvline(0, color="black", lw=1)
    ax.set(title="cos(g_safety, g_utility), all chosen modules flattened", xlabel="cosine", ylabel="samples")
    ax.legend()
    c.save(fig, "cosine_hist.png")

    fig, ax = c.plt.subplots(figsize=(7, 4))
    for task in c.tasks:
        by_layer = cos["tasks"][task]["by_layer"]
        layers = _digit_layers(by_layer)
        ax.plot([int(x) for x in layers], [by_layer[x]["frac_negative"] for x in layers], "o-", label=task,
                color=c.colors[task])  # fmt: skip
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(title="fraction of utility samples with cos < 0, per layer", xlabel="layer", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    c.save(fig, "cosine_layers.png")


def _plot_overlap(c: _Canvas, ov: dict[str, Any]) -> None:
    """(III) φ of single-sample against batch safety subspaces, over the batch size."""
    fig, ax = c.plt.subplots(figsize=(7, 4))
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
    c.save(fig, "overlap.png")


def plot_analysis(analysis: dict[str, Any], folder: str | Path) -> list[str]:
    """PNG figures of the three insights in ``folder``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and no GUI backend chosen behind the caller's back
    import matplotlib.pyplot as plt

    canvas = _Canvas(plt, Path(folder), list(analysis["cosine"]["tasks"]))
    _plot_cer_spectra(canvas, analysis["cer"])
    _plot_cer_layers(canvas, analysis["cer"])
    _plot_cosines(canvas, analysis["cosine"])
    _plot_overlap(canvas, analysis["overlap"])
    return canvas.written


# ---------------------------------------------------------------------------------------------- markdown


def _fig(figures: str, name: str, alt: str) -> str:
    return f"![{alt}]({figures.rstrip('/')}/{name})"


def _finding(block: dict) -> list[str]:
    return [f"**Finding.** {block['finding']}", ""] if block.get("finding") else []


def _cells(at: dict[str, float], ks: Sequence[int]) -> str:
    return " | ".join(f"{at[str(k)]:.3f}" for k in ks)


def _cer_section(cfg: dict[str, Any], cer: dict[str, Any], tasks: list[str], figures: str) -> list[str]:
    ks = [k for k in SUMMARY_KS if k <= len(cer["ks"])]
    out = [
        "## I. CER spectra (like for like)",
        "",
        *_finding(cer),
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
        out.append(
            f"| {who}, single | 1 (mean of {single['n_pairs']}) | {tok:.1f} | {sup:.1f} | "
            + _cells(single[who]["at"], ks)
            + " |"
        )
    for n in sorted(cer["batch"], key=int):
        block = cer["batch"][n]
        for who in ["safety", *tasks]:
            t = block["tokens"][who]
            out.append(
                f"| {who}, batch | {n} | {t['tokens'] / int(n):.1f} | {t['supervised'] / int(n):.1f} | "
                + _cells(block[who]["at"], ks)
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
    return [*out, "", _fig(figures, "cer_spectra.png", "CER spectra"), "",
            _fig(figures, "cer_layers.png", "CER per layer"), ""]  # fmt: skip


def _cosine_section(cos: dict[str, Any], tasks: list[str], figures: str) -> list[str]:
    out = [
        "## II. Gradient conflict: cos(g_safety, g_utility)",
        "",
        *_finding(cos),
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
    return [*out, "", _fig(figures, "cosine_hist.png", "cosine histogram"), "",
            _fig(figures, "cosine_layers.png", "cosine per layer"), ""]  # fmt: skip


def _overlap_section(cfg: dict[str, Any], ov: dict[str, Any], figures: str) -> list[str]:
    capped = cfg.get("batch_sizes_requested", ov["batch_sizes"]) != ov["batch_sizes"]
    out = [
        f"## III. Overlap φ@{ov['rank']} of single-sample and batch safety subspaces",
        "",
        *_finding(ov),
        *(
            [
                f"Batch sizes {cfg['batch_sizes_requested']} were asked for; only {cfg['n_safety_available']} "
                f"safety samples were available, so {ov['batch_sizes']} were used.",
                "",
            ]
            if capped
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
    return [*out, "", _fig(figures, "overlap.png", "overlap vs batch size"), ""]


def render_markdown(analysis: dict[str, Any], figures: str = ".") -> str:
    """A markdown summary of an analysis (numbers and figure links; figures relative to ``figures``)."""
    cfg, cos = analysis["config"], analysis["cosine"]
    tasks = list(cos["tasks"])
    out = [
        f"Model `{cfg.get('model', '?')}`, {cfg['n_modules']} modules "
        f"(layers {_ranges(cfg['layers'])}; {', '.join(cfg['module_types'])}), "
        f"safety samples from `{cfg.get('safety', '?')}` ({cfg['n_safety_available']} available).",
        "",
        *_cer_section(cfg, analysis["cer"], tasks, figures),
        *_cosine_section(cos, tasks, figures),
        *_overlap_section(cfg, analysis["overlap"], figures),
    ]
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
