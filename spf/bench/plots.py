"""The benchmark report's figures, drawn from ``bench.json`` alone (no re-run).

One rule for every figure, because the earlier ones could not be read (≈ 50 overlapping point labels, ≈ 45
lines in repeating colours, a legend cut off): **colour encodes the method** (the same colour in every
figure, :func:`palette`), marker shape the scenario, every rate carries its 95 % interval as an error bar,
the aligned base is a grey reference line, and each figure has one legend, outside the axes. Labels are
tick labels or a handful of short annotations, never one per point of a crowd.

The data shaping (:func:`frontier_groups`, :func:`palette`, :func:`final_rate`) is pure and tested without
matplotlib; :func:`draw_report_plots` draws.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from spf.bench.config import BenchConfig, cells
from spf.io import atomic_path

__all__ = ["draw_report_plots", "final_rate", "frontier_groups", "palette"]

# tab10 without its grey (index 7, kept for the aligned base), then tab20's lighter halves: 19 distinct
_COLOURS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
    "#393b79",
]  # fmt: skip
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
BASE_COLOUR = "#7f7f7f"
Point = tuple[float, float, float]  # rate, ci_low, ci_high


def palette(methods: list[str]) -> dict[str, str]:
    """One colour per method, in the config's order, stable across figures; beyond 19 methods colours
    repeat (a config that large needs small multiples, not more hues)."""
    return {m: _COLOURS[i % len(_COLOURS)] for i, m in enumerate(methods)}


def final_rate(record: dict[str, Any] | None, suite: str) -> Point | None:
    """(rate, low, high) of a suite at the cell's last evaluation point, or None when it did not run."""
    s = ((record or {}).get("suites") or {}).get(suite)
    return None if s is None else (s["rate"], s["ci_low"], s["ci_high"])


def _without_lr(train: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train.items() if k != "lr"}


def frontier_groups(cfg: BenchConfig) -> dict[str, list[tuple[float, str]]]:
    """``"method@scenario"`` → ``[(lr, cell id), …]`` by rising lr: the matrix cell and every ablation of the
    same method and scenario that differs from it only in its learning rate (same subspace, same training
    settings otherwise). Only groups of two or more learning rates — a frontier needs a sweep."""
    default_lr = float(cfg.train.get("lr", 0.0))
    groups: dict[str, list[tuple[float, str]]] = {}
    for c in cells(cfg):
        if c.kind != "train" or c.method is None:
            continue
        if c.group == "ablation":
            plain = cfg.methods[c.method]
            if _without_lr(c.train) != _without_lr(plain) or c.subspace != cfg.subspace:
                continue
        groups.setdefault(f"{c.method}@{c.scenario}", []).append((float(c.train.get("lr", default_lr)), c.id))
    return {k: sorted(v) for k, v in groups.items() if len({lr for lr, _ in v}) >= 2}


def _base_record(cfg: BenchConfig, got: dict[str, Any], scenario: str | None) -> dict[str, Any]:
    """The aligned base as a scenario is evaluated (under its system prompt where the scenario says so)."""
    base = got.get("ref:aligned") or {}
    if scenario and cfg.scenarios[scenario].system_prompt_eval:
        base = (base.get("system_prompts") or {}).get(scenario) or {}
    return base


def _err(p: Point) -> list[list[float]]:
    """matplotlib's asymmetric error bar of a point (never negative, even for a rounding-edge interval)."""
    return [[max(0.0, p[0] - p[1])], [max(0.0, p[2] - p[0])]]


def _errorbar(ax: Any, x: Point, y: Point, **kw: Any) -> Any:
    return ax.errorbar(
        [x[0]], [y[0]], xerr=_err(x), yerr=_err(y),
        capsize=3, linestyle="none", **kw,
    )  # fmt: skip


def _base_lines(ax: Any, base: dict[str, Any], *, vertical: str | None = None) -> list[Any]:
    """The aligned base's harmful rate (horizontal) and, when asked, its utility (vertical), as handles."""
    handles = []
    h = final_rate(base, "harmful")
    if h:
        handles.append(ax.axhline(h[0], color=BASE_COLOUR, linestyle="--", label="aligned base"))
        ax.axhspan(h[1], h[2], color=BASE_COLOUR, alpha=0.12)
    u = final_rate(base, vertical) if vertical else None
    if u:
        handles.append(ax.axvline(u[0], color=BASE_COLOUR, linestyle=":", label="aligned base utility"))
    return handles


def _save(fig: Any, path: Path, plt: Any) -> None:
    with atomic_path(path, tracked_ok=True) as tmp:
        fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")  # tight: the outside legend is kept
    plt.close(fig)


def _legend(ax: Any, handles: list[Any] | None = None) -> None:
    kw = {"handles": handles} if handles is not None else {}
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, **kw)


def _matrix(cfg: BenchConfig) -> tuple[list[str], list[str]]:
    return cfg.matrix.get("methods") or list(cfg.methods), cfg.matrix.get("scenarios") or list(cfg.scenarios)


def _scatter(cfg: BenchConfig, got: dict[str, Any], plt: Any, path: Path) -> bool:
    """Harmful rate against utility at the last point, matrix cells: colour = method, marker = scenario."""
    from matplotlib.lines import Line2D

    methods, scenarios = _matrix(cfg)
    colours, drawn = palette(methods), set()
    fig, ax = plt.subplots(figsize=(7, 5))
    for si, scenario in enumerate(scenarios):
        for m in methods:
            rec = got.get(f"{m}@{scenario}")
            h, u = final_rate(rec, "harmful"), final_rate(rec, "utility")
            if h and u:
                _errorbar(ax, u, h, color=colours[m], marker=_MARKERS[si % len(_MARKERS)], markersize=7)
                drawn.add((m, scenario))
    if not drawn:
        plt.close(fig)
        return False
    handles = [Line2D([], [], color=colours[m], marker="o", linestyle="none", label=m) for m in methods
               if any(d[0] == m for d in drawn)]  # fmt: skip
    handles += [Line2D([], [], color="black", marker=_MARKERS[i % len(_MARKERS)], linestyle="none", label=s)
                for i, s in enumerate(scenarios) if any(d[1] == s for d in drawn)]  # fmt: skip
    handles += _base_lines(ax, _base_record(cfg, got, None), vertical="utility")
    ax.set(xlabel="utility (SST-2 accuracy)", ylabel="harmful rate", title="safety vs utility (last point)")
    _legend(ax, handles)
    _save(fig, path, plt)
    return True


def _frontier(cfg: BenchConfig, got: dict[str, Any], scenario: str, plt: Any, path: Path) -> bool:
    """The harm-vs-utility frontier over the learning rate: one line per method through its sweep, each
    point labelled with its lr. A method beyond another's frontier is below-right of its line."""
    methods, _ = _matrix(cfg)
    colours = palette(methods + sorted(set(cfg.methods) - set(methods)))
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = False
    for key, sweep in frontier_groups(cfg).items():
        method, _, scen = key.partition("@")
        pts = [
            (lr, final_rate(got.get(cid), "utility"), final_rate(got.get(cid), "harmful"))
            for lr, cid in sweep
        ]
        pts = [(lr, u, h) for lr, u, h in pts if u and h]
        if scen != scenario or len(pts) < 2:
            continue
        ax.plot([u[0] for _, u, _ in pts], [h[0] for _, _, h in pts], color=colours[method], label=method)
        for lr, u, h in pts:
            _errorbar(ax, u, h, color=colours[method], marker="o", markersize=5)
            ax.annotate(f"{lr:g}", (u[0], h[0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    _base_lines(ax, _base_record(cfg, got, scenario), vertical="utility")
    ax.set(xlabel="utility (SST-2 accuracy)", ylabel="harmful rate (last point)",
           title=f"frontier over the learning rate: {scenario}")  # fmt: skip
    _legend(ax)
    _save(fig, path, plt)
    return True


def _ablations(cfg: BenchConfig, got: dict[str, Any], plt: Any, path: Path) -> bool:
    """Every finished ablation's final harmful rate as a dot with its interval, one row each (the names are
    tick labels, so they never overlap), coloured by the method it varies; the cell it varies and the
    aligned base are vertical reference lines."""
    rows = [(c, final_rate(got.get(c.id), "harmful")) for c in cells(cfg) if c.group == "ablation"]
    rows = sorted(((c, h) for c, h in rows if h), key=lambda r: r[1][0])
    if not rows:
        return False
    colours = palette(list(cfg.methods))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.28 * len(rows)))
    for i, (c, h) in enumerate(rows):
        ax.errorbar([h[0]], [i], xerr=_err(h), color=colours[c.method], marker="o",
                    capsize=3, linestyle="none")  # fmt: skip
    ax.set_yticks(
        range(len(rows)), [f"{c.id.removeprefix('ablation:')} ({c.method}@{c.scenario})" for c, _ in rows]
    )
    for ref in sorted({f"{c.method}@{c.scenario}" for c, _ in rows}):
        h = final_rate(got.get(ref), "harmful")
        if h:
            ax.axvline(h[0], color=colours[ref.partition("@")[0]], linestyle=":", label=ref)
    base = final_rate(got.get("ref:aligned"), "harmful")
    if base:
        ax.axvline(base[0], color=BASE_COLOUR, linestyle="--", label="aligned base")
    ax.set(xlabel="harmful rate (last point)", title="ablations")
    ax.tick_params(axis="y", labelsize=8)
    _legend(ax)
    _save(fig, path, plt)
    return True


def _curve(cfg: BenchConfig, got: dict[str, Any], scenario: str, plt: Any, path: Path) -> bool:
    """Harmful rate against the fine-tuning step, one line per method with its intervals, and the aligned
    base (as the scenario is evaluated) as a band; False when no cell of the scenario is done."""
    methods, _ = _matrix(cfg)
    colours = palette(methods)
    lines = {}
    for m in methods:
        curve = (got.get(f"{m}@{scenario}") or {}).get("curve", [])
        if curve and all("harmful" in p["suites"] for p in curve):
            lines[m] = [(p["step"], p["suites"]["harmful"]) for p in curve]
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for m, pts in lines.items():
        xs, ys = [x for x, _ in pts], [e["rate"] for _, e in pts]
        errs = [_err((e["rate"], e["ci_low"], e["ci_high"])) for _, e in pts]
        err = [[lo for (lo,), _ in errs], [hi for _, (hi,) in errs]]
        ax.errorbar(xs, ys, yerr=err, label=m, marker="o", capsize=3, color=colours[m])
    _base_lines(ax, _base_record(cfg, got, scenario))
    ax.set(
        xlabel="fine-tuning step",
        ylabel="harmful rate (pooled over seeds)",
        title=f"exposure curve: {scenario}",
    )
    _legend(ax)
    _save(fig, path, plt)
    return True


def _safety_loss(cfg: BenchConfig, got: dict[str, Any], plt: Any, path: Path) -> bool:
    """The held-out refusal loss over steps: one panel per scenario (small multiples), matrix cells only,
    colour = method, one legend for the figure."""
    methods, scenarios = _matrix(cfg)
    colours = palette(methods)
    panels = [s for s in scenarios if any((got.get(f"{m}@{s}") or {}).get("safety_curve") for m in methods)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False, sharey=True)
    shown: dict[str, Any] = {}
    for ax, s in zip(axes[0], panels, strict=True):
        for m in methods:
            curve = [
                e for e in (got.get(f"{m}@{s}") or {}).get("safety_curve") or [] if "safety_loss_heldout" in e
            ]
            if curve:
                (shown[m],) = ax.plot([e["step"] for e in curve], [e["safety_loss_heldout"] for e in curve],
                                      color=colours[m], label=m)  # fmt: skip
        ax.set(title=s, xlabel="step")
    axes[0][0].set_ylabel("held-out refusal loss (seed 0)")
    fig.legend(handles=list(shown.values()), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    _save(fig, path, plt)
    return True


def draw_report_plots(cfg: BenchConfig, data: dict[str, Any], folder: Path) -> dict[str, str]:
    """Every figure the finished cells allow, in ``folder``; title → path relative to the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(folder, Path(cfg.report).parent)
    got = data["cells"]
    out: dict[str, str] = {}
    if _scatter(cfg, got, plt, folder / "safety_vs_utility.png"):
        out["safety vs utility"] = f"{rel}/safety_vs_utility.png"
    for scenario in _matrix(cfg)[1]:
        if _curve(cfg, got, scenario, plt, folder / f"curve_{scenario}.png"):
            out[f"exposure curve: {scenario}"] = f"{rel}/curve_{scenario}.png"
        if _frontier(cfg, got, scenario, plt, folder / f"frontier_{scenario}.png"):
            out[f"frontier: {scenario}"] = f"{rel}/frontier_{scenario}.png"
    if _ablations(cfg, got, plt, folder / "ablations.png"):
        out["ablations"] = f"{rel}/ablations.png"
    if _safety_loss(cfg, got, plt, folder / "safety_loss.png"):
        out["safety loss over steps"] = f"{rel}/safety_loss.png"
    return out
