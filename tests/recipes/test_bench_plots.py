"""The report's figures (spf.bench.plots): which cells form a learning-rate frontier, and that every figure
follows the readability rules — colour = method (the same in every figure), intervals as error bars, the
aligned base as a reference line, one legend — on synthetic records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from spf.bench import plots
from spf.bench.config import load_bench_config

ROOT = Path(__file__).resolve().parents[2]


def _suite(rate: float) -> dict[str, float]:
    return {"rate": rate, "ci_low": rate - 0.04, "ci_high": rate + 0.05, "n": 100, "k": int(100 * rate)}


def _record(harmful: float, utility: float, steps: tuple[int, ...] = (20, 250)) -> dict[str, Any]:
    curve = [{"step": s, "suites": {"harmful": _suite(harmful * s / steps[-1])}} for s in steps]
    return {
        "suites": {"harmful": _suite(harmful), "utility": _suite(utility)},
        "curve": curve,
        "safety_curve": [{"step": s, "safety_loss_heldout": 1.0 + harmful * s / 250} for s in (0, 5, 10)],
    }


def test_frontier_groups_are_the_lr_sweeps_of_each_method_and_nothing_else():
    cfg = load_bench_config(ROOT / "bench" / "cpu.yaml")
    groups = plots.frontier_groups(cfg)
    assert groups == {
        "vanilla@mix10": [(1e-4, "ablation:vanilla-lr1e-4"), (5e-4, "vanilla@mix10")],
        "spf@mix10": [(1e-5, "ablation:lr1e-5"), (1e-4, "ablation:lr1e-4"), (5e-4, "spf@mix10"),
                      (1e-3, "ablation:lr1e-3")],
    }  # fmt: skip
    # full fine-tuning changes lr *and* more: not a point of the LoRA frontier; nor is rank1 (same lr)
    assert all("full-ft" not in cid and "rank1" not in cid for g in groups.values() for _, cid in g)
    dev = plots.frontier_groups(load_bench_config(ROOT / "bench" / "cpu_dev.yaml"))
    assert [lr for lr, _ in dev["vanilla@mix10"]] == [5e-5, 1e-4, 2e-4, 5e-4, 1e-3]
    assert [lr for lr, _ in dev["spf@mix10"]] == [5e-5, 1e-4, 2e-4, 5e-4, 1e-3]
    assert "lisa@mix10" not in dev  # rho 0.1/1/10 at one lr is not a frontier


def test_palette_is_distinct_and_stable():
    methods = [f"m{i}" for i in range(19)]
    colours = plots.palette(methods)
    assert len(set(colours.values())) == 19 and plots.BASE_COLOUR not in colours.values()
    assert plots.palette(methods[:3]) == {m: colours[m] for m in methods[:3]}


@pytest.fixture
def figures(monkeypatch, tmp_path):
    """Draw every figure of bench/cpu.yaml from synthetic records; capture each figure before it closes."""
    import matplotlib.pyplot as plt

    saved: dict[str, Any] = {}

    def keep(fig, path, _plt):
        saved[Path(path).name] = fig
        fig.savefig(path)

    monkeypatch.setattr(plots, "_save", keep)
    cfg = load_bench_config(ROOT / "bench" / "cpu.yaml")
    cfg.report = str(tmp_path / "docs" / "results.md")
    got = {
        "ref:aligned": {"suites": {"harmful": _suite(0.06), "utility": _suite(0.65)}},
        "vanilla@mix10": _record(0.75, 0.85),
        "spf@mix10": _record(0.69, 0.87),
        "ablation:vanilla-lr1e-4": _record(0.80, 0.83),
        "ablation:lr1e-4": _record(0.35, 0.86),
        "ablation:lr1e-3": _record(0.62, 0.85),
        "ablation:rank1": _record(0.57, 0.86),
        "ablation:conflict": _record(0.74, 0.86),
    }
    out = plots.draw_report_plots(cfg, {"cells": got}, tmp_path / "figs")
    yield cfg, out, saved
    plt.close("all")


def _colour(artist: Any) -> str:
    from matplotlib.colors import to_hex

    return to_hex(artist.get_color())


def test_every_figure_is_drawn_with_one_legend_outside_the_axes(figures):
    _cfg, out, saved = figures
    assert set(out) == {"safety vs utility", "exposure curve: mix10", "frontier: mix10", "ablations",
                        "safety loss over steps"}  # fmt: skip
    assert all(p.startswith("../figs/") for p in out.values())
    for name, fig in saved.items():
        legends = [a.get_legend() for a in fig.axes if a.get_legend()] + list(fig.legends)
        assert len(legends) == 1, name
        ax = fig.axes[0]
        if name != "safety_loss.png":  # anchored to the right of the axes, so it never covers a point
            assert legends[0].get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1, name


def test_colour_encodes_the_method_in_every_figure(figures):
    cfg, _, saved = figures
    colours = plots.palette(cfg.matrix["methods"])
    scatter = saved["safety_vs_utility.png"].axes[0]
    labels = [t.get_text() for t in scatter.get_legend().get_texts()]
    assert labels == ["vanilla", "spf", "mix10", "aligned base", "aligned base utility"]
    # the curve's lines, the frontier's lines and the safety-loss lines carry the method's colour
    curve = {c.get_label(): _colour(c.lines[0]) for c in saved["curve_mix10.png"].axes[0].containers}
    frontier = {ln.get_label(): _colour(ln) for ln in saved["frontier_mix10.png"].axes[0].get_lines()}
    loss = {ln.get_label(): _colour(ln) for ln in saved["safety_loss.png"].axes[0].get_lines()}
    for m in ("vanilla", "spf"):
        assert curve[m] == frontier[m] == loss[m] == colours[m]
    # the frontier runs through the sweep in lr order: spf's x values are its cells' utilities by lr
    spf_line = next(ln for ln in saved["frontier_mix10.png"].axes[0].get_lines() if ln.get_label() == "spf")
    assert list(spf_line.get_xdata()) == [0.86, 0.87, 0.85]  # lr 1e-4, 5e-4, 1e-3 (1e-5 not run)


def test_ablations_are_rows_sorted_by_rate_against_their_cell_and_the_base(figures):
    _, _, saved = figures
    ax = saved["ablations.png"].axes[0]
    names = [t.get_text().split(" ")[0] for t in ax.get_yticklabels()]
    assert names == ["lr1e-4", "rank1", "lr1e-3", "conflict", "vanilla-lr1e-4"]
    refs = {ln.get_label(): ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() in (":", "--")}
    assert refs == {"spf@mix10": 0.69, "vanilla@mix10": 0.75, "aligned base": 0.06}
