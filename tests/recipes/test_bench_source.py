"""``extends:`` in benchmark files (spf.bench.source), the shipped dev-prompt tuning file built on it, and the
paired comparison of two cells (spf.bench.compare.cell_rows, `spf bench compare`)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from spf.bench.config import BenchConfigError, load_bench_config
from spf.bench.source import merge, read_bench_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_merge_merges_mappings_and_replaces_everything_else():
    parent = {
        "a": 1,
        "eval": {"split": "test", "limits": {"harmful": None, "prefill": 40}},
        "seeds": [0, 1, 2],
    }
    child = {"eval": {"split": "dev", "limits": {"prefill": 10}}, "seeds": [0], "b": 2}
    assert merge(parent, child) == {
        "a": 1,
        "b": 2,
        "eval": {"split": "dev", "limits": {"harmful": None, "prefill": 10}},
        "seeds": [0],
    }
    assert parent["eval"]["split"] == "test"  # the parent is not modified


def test_extends_is_read_relative_to_the_file_and_chains(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("name: base\nseed: 3\neval: {split: test, judge: v2}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../base.yaml\nname: mid\neval: {split: dev}\n")
    (tmp_path / "sub" / "top.yaml").write_text("extends: mid.yaml\nseed: 4\n")
    assert read_bench_yaml(tmp_path / "sub" / "top.yaml") == {
        "name": "mid",
        "seed": 4,
        "eval": {"split": "dev", "judge": "v2"},
    }


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"a.yaml": "extends: b.yaml\nname: a\n", "b.yaml": "extends: a.yaml\n"}, "cycle"),
        ({"a.yaml": "extends: missing.yaml\nname: a\n"}, "missing.yaml: benchmark file not found"),
        ({"a.yaml": "extends: [x]\n"}, "extends: expected the path"),
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "- not a mapping\n"}, "b.yaml: expected a mapping"),
    ],
)
def test_a_broken_chain_names_the_file(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(BenchConfigError, match=match) as info:
        load_bench_config(tmp_path / "a.yaml")
    assert str(tmp_path / "a.yaml") in str(info.value)


def test_the_dev_file_is_the_test_benchmark_on_dev_prompts():
    dev = load_bench_config(ROOT / "bench" / "cpu_dev.yaml")
    test = load_bench_config(ROOT / "bench" / "cpu.yaml")
    assert (dev.eval.split, test.eval.split) == ("dev", "test")
    # nothing it publishes or keeps can be mistaken for (or overwrite) the test benchmark's
    assert len({dev.work, test.work}) == len({dev.keep, test.keep}) == len({dev.report, test.report}) == 2
    # the same models, training and judging: only the split and what tuning needs differ
    assert (dev.aligned, dev.train, dev.methods, dev.subspace) == (
        test.aligned,
        test.train,
        test.methods,
        test.subspace,
    )
    same = ("judge", "max_new_tokens", "batch_size", "limits", "utility_tasks")
    assert {k: asdict(dev.eval)[k] for k in same} == {k: asdict(test.eval)[k] for k in same}
    names = [a.name for a in dev.ablations]
    assert {"lisa-rho0.1", "lisa-rho10", "random-subspace", "shrink", "total-change"} <= set(names)
    assert any(n.startswith("vanilla-lr") for n in names) and any(n.startswith("spf-lr") for n in names)


def _record(scenario: str, steps: dict[int, dict[str, dict[str, str]]]) -> dict:
    """A cell record with per-seed 0/1 verdict strings, judged on one prompt list per suite."""
    return {
        "scenario": scenario,
        "steps": sorted(steps),
        "verdicts": {
            str(step): {
                suite: {"prompts_sha256": f"sha-{suite}", "by_seed": by_seed}
                for suite, by_seed in suites.items()
            }
            for step, suites in steps.items()
        },
    }


def test_cell_rows_pair_two_cells_on_shared_steps_suites_and_seeds():
    from spf.bench.compare import cell_rows, table_lines

    cfg = load_bench_config(ROOT / "bench" / "cpu.yaml")
    worse = "1" * 30 + "0" * 10
    better = "1" * 5 + "0" * 35
    a = _record(
        "mix10",
        {80: {"harmful": {"1": worse}}, 250: {"harmful": {"1": worse, "2": worse}, "prefill": {"1": better}}},
    )
    b = _record(
        "mix10",
        {80: {"harmful": {"1": better}}, 250: {"harmful": {"1": better}}, 160: {"harmful": {"1": worse}}},
    )
    rows = cell_rows(cfg, {"ablation:x": a, "spf@mix10": b}, "ablation:x", "spf@mix10")
    # steps both have (80, 250), suites both judged (prefill only in a), seeds both ran (seed 1)
    assert [(r.step, r.suite, r.seeds) for r in rows] == [(80, "harmful", 1), (250, "harmful", 1)]
    for r in rows:
        assert (r.a_rate, r.b_rate) == (0.75, 0.125) and r.diff == pytest.approx(0.625)
        assert r.test == "McNemar" and r.p < 1e-6 and r.significant
        assert r.p_holm >= r.p  # one Holm family
    assert len(table_lines(rows, 0.05)) == 2 + len(rows)
    with pytest.raises(KeyError, match="ablation:missing"):
        cell_rows(cfg, {"spf@mix10": b}, "ablation:missing", "spf@mix10")
