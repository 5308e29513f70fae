"""`spf bench`: config checking, the cell matrix, and a tiny end-to-end run (resumable, report from JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from spf.bench.run import (
    BenchConfigError,
    SubspaceSpec,
    cells,
    load_bench_config,
    run_bench,
    select_cells,
    write_report,
)
from spf.cli.main import main as spf_main

ROOT = Path(__file__).resolve().parents[2]


def _tiny(tmp_path: Path, shared: Path, **over) -> Path:
    cfg = {
        "name": "tiny",
        "aligned": "tiny-llama",
        "unaligned": None,
        "work": str(tmp_path / "work"),
        "report": str(tmp_path / "docs" / "results.md"),
        "shared_data": str(shared),
        "data_n": 16,
        "heldout_harmful": 6,
        "subspace": {"own_response": False, "rank": 2},
        "train": {
            "steps": 2,
            "batch_size": 2,
            "lora": {"r": 2, "alpha": 4.0},
            "eval_every": 1,
            "heldout_n": 2,
            "task_eval_n": 2,
            "max_length": 64,
            "resume": False,
        },
        "eval": {
            "suites": ["harmful", "utility"],
            "limits": {"harmful": 2, "utility": 4},
            "max_new_tokens": 4,
            "batch_size": 4,
        },
        "methods": {"vanilla": {"method": "vanilla"}, "spf": {"method": "spf", "spf": {"rank": 2}}},
        "scenarios": {"sst2": {"kind": "sst2"}},
        "ablations": [
            {"name": "rank1", "base": "spf@sst2", "train": {"spf": {"rank": 1}}},
            {"name": "full", "base": "spf@sst2", "train": {"finetune": "full", "steps": 1}},
        ],
    }
    cfg.update(over)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_shipped_cpu_benchmark_is_valid():
    cfg = load_bench_config(ROOT / "bench" / "cpu.yaml")
    ids = [c.id for c in cells(cfg)]
    assert ids[:2] == ["ref:unaligned", "ref:aligned"]
    assert "spf@mix10" in ids and "safegrad@deep" in ids and "ablation:margin" in ids
    assert len(ids) == len(set(ids))


def test_ablation_merges_overrides_and_keeps_the_rest(tmp_path, shared_data):
    cfg = load_bench_config(_tiny(tmp_path, shared_data))
    abl = next(c for c in cells(cfg) if c.id == "ablation:rank1")
    assert abl.train == {"method": "spf", "spf": {"rank": 1}}
    base = next(c for c in cells(cfg) if c.id == "spf@sst2")
    assert base.train == {"method": "spf", "spf": {"rank": 2}}  # the base cell is not mutated


def test_only_selects_cells_in_the_order_given():
    cfg = load_bench_config(ROOT / "bench" / "cpu.yaml")
    ids = [c.id for c in select_cells(cfg, ["ablation:margin", "spf@"])]
    assert ids == ["ablation:margin", "spf@sst2", "spf@mix10", "spf@mix20", "spf@aoa", "spf@deep"]
    # a full id is that cell alone; a prefix selects every cell it starts
    assert [c.id for c in select_cells(cfg, ["ablation:margin-"])][:2] == [
        "ablation:margin-refresh10",
        "ablation:margin-refresh20",
    ]
    with pytest.raises(BenchConfigError, match="no cell matches"):
        select_cells(cfg, ["nothing"])


def test_subspace_key_depends_on_every_field():
    a = SubspaceSpec()
    assert a.key() == SubspaceSpec().key()
    assert (
        len(
            {a.key(), SubspaceSpec(loss="margin").key(), SubspaceSpec(n=8).key(), SubspaceSpec(index=3).key()}
        )
        == 4
    )


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"bogus": 1}, "unknown key(s) bogus"),
        ({"eval": {"suites": ["harmful", "nope"]}}, "eval.suites[1]"),
        ({"matrix": {"methods": ["spf", "lora-only"]}}, "matrix.methods[1]"),
        ({"ablations": [{"name": "x", "base": "spf@nowhere"}]}, "ablations[0].base"),
        (
            {"ablations": [{"name": "x", "base": "spf@sst2", "subspace": {"ranks": 3}}]},
            "ablations[0].subspace",
        ),
        ({"methods": {"vanilla": {"method": "vanila"}, "spf": {"method": "spf"}}}, "cell vanilla@sst2"),
        ({"scenarios": {"sst2": {"kind": "sst2", "p": 2.0}}}, "scenarios.sst2.p"),
    ],
)
def test_bad_benchmark_files_name_file_and_key(tmp_path, shared_data, over, needle):
    path = _tiny(tmp_path, shared_data, **over)
    with pytest.raises(BenchConfigError) as err:
        load_bench_config(path)
    assert str(path) in str(err.value) and needle in str(err.value)
    assert not (tmp_path / "work").exists()


def test_cli_reports_bad_file_with_exit_2(tmp_path, capsys):
    assert spf_main(["bench", "list", str(tmp_path / "missing.yaml")]) == 2
    assert "benchmark file not found" in capsys.readouterr().err


def test_tiny_benchmark_end_to_end_resumes_and_reports(tmp_path, shared_data, capsys):
    path = _tiny(tmp_path, shared_data)
    cfg = load_bench_config(path)
    codes = run_bench(cfg)
    assert codes == {
        "ref:aligned": 0,
        "vanilla@sst2": 0,
        "spf@sst2": 0,
        "ablation:rank1": 0,
        "ablation:full": 0,
    }
    work = tmp_path / "work"
    spf_cell = json.loads((work / "cells" / "spf__sst2" / "cell.json").read_text())
    assert spf_cell["train"]["method"] == "spf" and spf_cell["train"]["steps"] == 2
    assert set(spf_cell["suites"]) >= {"harmful", "utility"}
    assert spf_cell["suites"]["harmful"]["n"] == 2
    assert spf_cell["train_peak_rss_mb"] > 0
    abl = json.loads((work / "cells" / "ablation--rank1" / "cell.json").read_text())
    assert abl["train_config"]["spf"]["rank"] == 1
    # full fine-tuning writes a whole model: the cell evaluates it through load_finetuned (its own weights)
    full = json.loads((work / "cells" / "ablation--full" / "cell.json").read_text())
    assert full["train"]["finetune"] == "full" and full["suites"]["harmful"]["n"] == 2
    full_eval = json.loads(
        (work / "cells" / "ablation--full" / "eval" / "harmful" / "results.json").read_text()
    )
    assert full_eval["adapter"] == str(work / "cells" / "ablation--full" / "adapter")
    # the held-out harmful prompts never appear in a training set
    heldout = (work / "data" / "heldout_harmful.csv").read_text()
    trained = {json.loads(line)["messages"][0]["content"] for line in (work / "data" / "sst2.jsonl").open()}
    assert not any(p in heldout for p in trained)

    # a second run redoes nothing
    stamp = (work / "cells" / "spf__sst2" / "cell.json").stat().st_mtime_ns
    assert run_bench(cfg) == {}
    assert (work / "cells" / "spf__sst2" / "cell.json").stat().st_mtime_ns == stamp

    report = write_report(cfg).read_text()
    bench_json = json.loads((tmp_path / "docs" / "results" / "bench" / "bench.json").read_text())
    rate = bench_json["cells"]["spf@sst2"]["suites"]["harmful"]
    assert f"{rate['rate']:.2f} [{rate['ci_low']:.2f}, {rate['ci_high']:.2f}] n=2" in report
    assert "rank1 (spf@sst2)" in report and "Not run yet" not in report
    assert (tmp_path / "docs" / "results" / "bench" / "safety_vs_utility.png").stat().st_size > 1000

    assert spf_main(["bench", "list", str(path)]) == 0
    assert capsys.readouterr().out.count("done ") == 5


def test_report_cost_section_and_check_come_from_the_overhead_json(tmp_path, shared_data):
    """The side-by-side cost (benchmarks/bench_overhead.py --json) is rendered with a verdict per SPF
    configuration computed from the ratio — a 1.04× run meets the ≤ 1.05× target, a 1.20× run does not."""
    from spf.bench.run import acceptance_lines, collect, render_report

    overhead = {
        "command": "python benchmarks/bench_overhead.py --json x.json",
        "model": "m",
        "batch_size": 8,
        "steps": 8,
        "rounds": 2,
        "threads": 1,
        "finished": "2026-11-30 21:00:00",
        "configs": {
            "vanilla": {"median_step_s": 4.0, "step_ratio": 1.0, "peak_rss_mb": 2700, "rss_ratio": 1.0},
            "spf-T1": {"median_step_s": 4.8, "step_ratio": 1.2, "peak_rss_mb": 2800, "rss_ratio": 1.04},
            "spf-T10": {"median_step_s": 4.16, "step_ratio": 1.04, "peak_rss_mb": 2750, "rss_ratio": 1.02},
            "safegrad": {"median_step_s": 7.0, "step_ratio": 1.75, "peak_rss_mb": 2600, "rss_ratio": 0.96},
        },
        "refresh_median_s": 0.85,
    }
    (tmp_path / "overhead.json").write_text(json.dumps(overhead))
    cfg = load_bench_config(_tiny(tmp_path, shared_data, overhead=str(tmp_path / "overhead.json")))
    data = collect(cfg)
    checks = "\n".join(acceptance_lines(cfg, data))
    assert "spf-T10 1.04× vanilla step time (≤ 1.05×: met); SafeGrad 1.75×" in checks
    assert "spf-T1 1.20× vanilla step time (≤ 1.05×: NOT met)" in checks
    report = render_report(cfg, data, {})
    assert (
        "## Cost, side by side" in report
        and "| spf-T10 | 4.160 s | 1.04 | — | — | 2750 MB | 1.02 |" in report
    )
    # with the mean (amortised) ratio recorded, the check uses it: a refresh every 10 steps is in the mean
    overhead["configs"]["spf-T10"].update(mean_step_s=4.4, mean_ratio=1.1)
    (tmp_path / "overhead.json").write_text(json.dumps(overhead))
    assert "spf-T10 1.10× vanilla step time (≤ 1.05×: NOT met)" in "\n".join(
        acceptance_lines(cfg, collect(cfg))
    )
    # a configured but missing file leaves the section out instead of failing the report
    cfg2 = load_bench_config(_tiny(tmp_path, shared_data, overhead=str(tmp_path / "missing.json")))
    assert "Cost, side by side" not in render_report(cfg2, collect(cfg2), {})
