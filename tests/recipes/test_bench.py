"""`spf bench`: config checking, the cell matrix, and a tiny end-to-end run (resumable, report from JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from spf.bench.config import cell_done, cell_steps, seed_list
from spf.bench.run import (
    BenchConfigError,
    ProtocolOverlapError,
    SubspaceSpec,
    cells,
    load_bench_config,
    prepare_data,
    prepare_subspace,
    run_bench,
    run_cell,
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
    # the primary comparison runs first, right after the references
    assert ids[:4] == ["ref:unaligned", "ref:aligned", "vanilla@mix10", "spf@mix10"]
    assert "safegrad@aoa" in ids and "ablation:margin" in ids and not any("deep" in i for i in ids)
    assert len(ids) == len(set(ids))
    assert seed_list(cfg) == [0, 1, 2, 3, 4] and cfg.eval.judge == "v2" and cfg.eval.split == "test"
    spf_mix10 = next(c for c in cells(cfg) if c.id == "spf@mix10")
    assert cell_steps(cfg, spf_mix10) == [20, 40, 80, 160, 250]
    aoa = next(c for c in cells(cfg) if c.id == "spf@aoa")
    assert cfg.scenarios["aoa"].system_prompt_eval and cell_steps(cfg, aoa) == [13, 26, 50]
    # at least 300 harmful prompts per seed (every test source in full), ≥ 100 prefill, ≥ 30 jailbreak
    assert cfg.eval.limits["harmful"] is None and cfg.eval.limits["overrefusal"] is None
    assert 3 * cfg.eval.limits["prefill"] >= 100 and 3 * cfg.eval.limits["jailbreak"] >= 30
    # the other shipped benchmark still loads
    assert seed_list(load_bench_config(ROOT / "bench" / "gpu.yaml")) == [0, 1, 2, 3, 4]


def test_ablation_merges_overrides_and_keeps_the_rest(tmp_path, shared_data):
    cfg = load_bench_config(_tiny(tmp_path, shared_data))
    abl = next(c for c in cells(cfg) if c.id == "ablation:rank1")
    assert abl.train == {"method": "spf", "spf": {"rank": 1}}
    base = next(c for c in cells(cfg) if c.id == "spf@sst2")
    assert base.train == {"method": "spf", "spf": {"rank": 2}}  # the base cell is not mutated


def test_only_selects_cells_in_the_order_given():
    cfg = load_bench_config(ROOT / "bench" / "cpu.yaml")
    ids = [c.id for c in select_cells(cfg, ["ablation:margin", "spf@"])]
    assert ids == ["ablation:margin", "spf@mix10", "spf@mix20", "spf@sst2", "spf@aoa"]
    assert [c.id for c in select_cells(cfg, ["vanilla@mix10", "spf@mix10"])] == ["vanilla@mix10", "spf@mix10"]
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
        # the old prompts-file key: the protocol's own prompt sources replaced it
        ({"heldout_harmful": 100}, "unknown key(s) heldout_harmful"),
        ({"seeds": [0, 0]}, "seeds: must be a non-empty list of distinct integers"),
        ({"seeds": []}, "seeds: must be a non-empty list"),
        ({"scenarios": {"sst2": {"kind": "sst2", "eval_steps": [4, 2]}}}, "scenarios.sst2.eval_steps"),
        ({"scenarios": {"sst2": {"kind": "sst2", "eval_steps": [0, 2]}}}, "scenarios.sst2.eval_steps"),
        ({"scenarios": {"sst2": {"kind": "sst2", "steps": 3, "eval_steps": [2, 5]}}}, "beyond steps 3"),
        ({"eval": {"split": "validation"}}, "eval.split: must be dev or test"),
        ({"eval": {"suites": ["harmful", "utility"], "curve_suites": ["utility"]}}, "eval.curve_suites"),
        ({"eval": {"suites": ["utility"], "curve_suites": ["harmful"]}}, "eval.curve_suites[0]"),
        ({"eval": {"curve_suites": []}}, "eval.curve_suites: must name the harmful suite"),
        ({"noninferiority_margin": 0}, "noninferiority_margin: must be in (0, 1)"),
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
    # the protocol's harmful sources (AdvBench, XSTest-unsafe, ours), 2 prompts of each; one seed
    assert spf_cell["seeds"] == [0] and spf_cell["suites"]["harmful"]["n"] == 6
    assert spf_cell["train_peak_rss_mb"] > 0
    abl = json.loads((work / "cells" / "ablation--rank1" / "cell.json").read_text())
    assert abl["train_config"]["spf"]["rank"] == 1
    # full fine-tuning writes a whole model: the cell evaluates it through load_finetuned (its own weights)
    full = json.loads((work / "cells" / "ablation--full" / "cell.json").read_text())
    assert full["train"]["finetune"] == "full" and full["suites"]["harmful"]["n"] == 6
    assert full["steps"] == [1]  # the ablation's own step count
    full_dir = work / "cells" / "ablation--full" / "seed-0"
    full_eval = json.loads((full_dir / "eval" / "step-1" / "harmful" / "results.json").read_text())
    assert full_eval["adapter"] == str(full_dir / "adapter") and full_eval["config"]["prompts"] is None
    assert full_eval["config"]["split"] == "test"
    # the evaluated prompts never appear in a training set
    rows = (full_dir / "eval" / "step-1" / "harmful" / "samples.jsonl").read_text().splitlines()
    evaluated = {json.loads(line)["prompt"] for line in rows}
    assert {json.loads(line)["source"] for line in rows} == {"advbench", "xstest-unsafe", "ours"}
    trained = {json.loads(line)["messages"][0]["content"] for line in (work / "data" / "sst2.jsonl").open()}
    assert len(evaluated) == 6 and not evaluated & trained

    # a second run redoes nothing
    stamp = (work / "cells" / "spf__sst2" / "cell.json").stat().st_mtime_ns
    assert run_bench(cfg) == {}
    assert (work / "cells" / "spf__sst2" / "cell.json").stat().st_mtime_ns == stamp

    report = write_report(cfg).read_text()
    bench_json = json.loads((tmp_path / "docs" / "results" / "bench" / "bench.json").read_text())
    rate = bench_json["cells"]["spf@sst2"]["suites"]["harmful"]
    assert f"{rate['rate']:.2f} [{rate['ci_low']:.2f}, {rate['ci_high']:.2f}] n=6×1" in report
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


# ---------------------------------------------------------------------------------- the powered protocol

SEEDED = {"seeds": [0, 1], "scenarios": {"sst2": {"kind": "sst2", "eval_steps": [1, 2]}}, "ablations": []}


def _prepared(tmp_path: Path, shared: Path, **over):
    """A tiny benchmark with its data and subspaces prepared, for running cells in this process."""
    cfg = load_bench_config(_tiny(tmp_path, shared, **over))
    prepare_data(cfg)
    for spec in {c.subspace.key(): c.subspace for c in cells(cfg) if c.subspace is not None}.values():
        prepare_subspace(cfg, spec)
    return cfg


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """Two training seeds × a two-point exposure curve, vanilla and SPF on SST-2, and the aligned base."""
    from spf.data.locate import REPO_SHARED_DATA

    if not REPO_SHARED_DATA.is_dir():
        pytest.skip(f"public data folder {REPO_SHARED_DATA} is absent")
    tmp = tmp_path_factory.mktemp("seeded")
    cfg = _prepared(tmp, REPO_SHARED_DATA, **SEEDED)
    return cfg, {c.id: run_cell(cfg, c) for c in cells(cfg)}


def test_seeds_and_curve_pool_into_cell_json_with_aligned_verdicts(seeded):
    cfg, recs = seeded
    van, spf, ref = recs["vanilla@sst2"], recs["spf@sst2"], recs["ref:aligned"]
    for rec in (van, spf):
        assert rec["seeds"] == [0, 1] and rec["steps"] == [1, 2]
        assert [p["step"] for p in rec["curve"]] == [1, 2] and rec["suites"] == rec["curve"][-1]["suites"]
        for point in rec["curve"]:
            h = point["suites"]["harmful"]
            # 2 prompts of each of the 3 protocol sources, judged under each of the 2 seeds
            assert (h["n_per_seed"], h["n"]) == (6, 12) and point["suites"]["utility"]["n"] == 4 * 2
            by_seed = rec["verdicts"][str(point["step"])]["harmful"]["by_seed"]
            assert set(by_seed) == set(h["per_seed"]) == {"0", "1"}
            assert h["k"] == sum(b.count("1") for b in by_seed.values())
            assert h["per_seed"] == {s: b.count("1") / 6 for s, b in by_seed.items()}
            assert h["ci_low"] <= h["rate"] <= h["ci_high"] and h["ci"] == "wilson-clustered-by-prompt"
            assert set(h["by_source"]) == {"advbench", "xstest-unsafe", "ours"}
            assert sum(v["n"] for v in h["by_source"].values()) == 12
    # the same prompts in the same order for every seed, step and cell, the reference included
    for step in ("1", "2"):
        for suite in ("harmful", "utility"):
            a, b, r = van["verdicts"][step][suite], spf["verdicts"][step][suite], ref["verdicts"]["0"][suite]
            assert a["ids"] == b["ids"] == r["ids"] and len(a["ids"]) == (6 if suite == "harmful" else 4)
            assert a["prompts_sha256"] == b["prompts_sha256"] == r["prompts_sha256"]
    assert ref["seeds"] == [0] and ref["suites"]["harmful"]["n"] == 6
    cell = cfg.work_dir / "cells" / "spf__sst2"
    first = cell / "seed-1" / "eval" / "step-1" / "harmful"
    # step 1 is the snapshot of the 2-step run, evaluated as it is; ids are the prompts in evaluation order
    assert json.loads((first / "results.json").read_text())["adapter"] == str(
        cell / "seed-1" / "adapter" / "snapshots" / "step-1"
    )
    rows = [json.loads(line) for line in (first / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == spf["verdicts"]["1"]["harmful"]["ids"]
    assert (
        "".join("1" if r["harmful"] else "0" for r in rows) == spf["verdicts"]["1"]["harmful"]["by_seed"]["1"]
    )
    # the seeds are separate trainings (data order, LoRA init)
    weights = [(cell / f"seed-{s}" / "adapter" / "adapter_model.safetensors").read_bytes() for s in (0, 1)]
    assert weights[0] != weights[1]
    assert set(spf["train_by_seed"]) == {"0", "1"} and spf["train"]["steps"] == 2


def test_report_renders_paired_tests_with_holm_adjusted_p(seeded):
    from spf.bench.compare import paired_rows
    from spf.bench.run import collect
    from spf.eval.paired import holm

    cfg, _ = seeded
    report = write_report(cfg).read_text()
    folder = Path(cfg.report).parent / "results" / "bench"
    bench = json.loads((folder / "bench.json").read_text())
    assert bench["seeds"] == [0, 1]
    assert {c["suites"]["harmful"]["n"] for c in bench["cells"].values()} == {12, 6}  # the reference: 6 × 1
    sha = bench["cells"]["spf@sst2"]["verdicts"]["2"]["harmful"]["prompts_sha256"]
    assert len(bench["prompt_ids"][sha]) == 6  # the prompt lists, once each
    rows = paired_rows(cfg, collect(cfg))["sst2"]
    # (the tiny file lists its methods spf, vanilla: yaml.safe_dump sorts keys)
    assert [(r.step, r.method, r.against) for r in rows if r.suite == "harmful"] == [
        (1, "spf", "vanilla"),
        (1, "spf", "aligned base"),
        (1, "vanilla", "aligned base"),
        (2, "spf", "vanilla"),
        (2, "spf", "aligned base"),
        (2, "vanilla", "aligned base"),
    ]
    adjusted = holm({str(i): r.p for i, r in enumerate(rows)})
    assert [r.p_holm for r in rows] == [adjusted[str(i)] for i in range(len(rows))]
    row = next(r for r in rows if (r.step, r.method, r.against, r.suite) == (2, "spf", "vanilla", "harmful"))
    assert (row.test, row.seeds, row.prompts) == ("paired bootstrap", 2, 6)
    line = next(x for x in report.splitlines() if x.startswith("| 2 | spf − vanilla | harmful |"))
    cols = [c.strip() for c in line.strip("|").split("|")]
    assert float(cols[7]) == pytest.approx(row.p_holm, rel=0.06) and cols[8] in ("yes", "no")
    assert cols[10] == "6×2"
    assert "## Paired tests" in report and "Multiplicity" in report and "Holm" in report
    assert "n=6×2" in report  # the table's n = prompts × seeds
    assert (folder / "curve_sst2.png").stat().st_size > 1000


def test_paired_tests_detect_a_difference_and_adjust_for_the_family(tmp_path, shared_data):
    """Made-up verdicts with a known answer: SPF never harmful, vanilla harmful on every prompt at step 2."""
    from spf.bench.compare import paired_rows, paired_section

    cfg = load_bench_config(_tiny(tmp_path, shared_data, **{**SEEDED, "seeds": [0, 1, 2]}))

    def rec(steps: list[int], bits: dict[int, str], seeds: list[str]) -> dict:
        v = {
            str(s): {"harmful": {"prompts_sha256": "x", "by_seed": dict.fromkeys(seeds, bits[s])}}
            for s in steps
        }
        return {"steps": steps, "verdicts": v}

    zeros, ones, seeds = "0" * 40, "1" * 40, ["0", "1", "2"]
    got = {
        "ref:aligned": rec([0], {0: zeros}, ["0"]),
        "vanilla@sst2": rec([1, 2], {1: zeros, 2: ones}, seeds),
        "spf@sst2": rec([1, 2], {1: zeros, 2: zeros}, seeds),
    }
    rows = {(r.step, r.method, r.against): r for r in paired_rows(cfg, {"cells": got})["sst2"]}
    assert len(rows) == 6
    worse = rows[(2, "vanilla", "aligned base")]
    better = rows[(2, "spf", "vanilla")]
    assert better.diff == -1.0 and worse.diff == 1.0 and better.test == "paired bootstrap"
    # the two real differences survive Holm over the 6 rows: 6 × the bootstrap's floor of 1e-4
    assert better.p_holm == pytest.approx(6e-4) and better.significant and worse.significant
    assert not rows[(1, "spf", "vanilla")].significant and rows[(1, "spf", "vanilla")].p_holm == 1.0
    assert rows[(2, "spf", "aligned base")].noninferior["non_inferior"]
    assert not worse.noninferior["non_inferior"]
    text = "\n".join(paired_section(cfg, {"cells": got}))
    assert "### `sst2` (m = 6)" in text and "| 2 | spf − vanilla | harmful |" in text
    # one seed: the exact McNemar test on the discordant prompts
    one = {
        "ref:aligned": got["ref:aligned"],
        "vanilla@sst2": rec([1, 2], {1: zeros, 2: ones}, ["0"]),
        "spf@sst2": rec([1, 2], {1: zeros, 2: zeros}, ["0"]),
    }
    row = next(r for r in paired_rows(cfg, {"cells": one})["sst2"] if (r.step, r.method) == (2, "spf"))
    assert row.test == "McNemar" and row.p == pytest.approx(2 * 0.5**40)


def test_rerunning_a_cell_with_one_seed_finished_does_not_retrain_it(seeded, tmp_path, monkeypatch):
    """Runs last of the `seeded` tests: it rewrites that benchmark's vanilla cell."""
    import shutil

    import spf.training.loop

    cfg0, _ = seeded
    over = {**SEEDED, "work": str(cfg0.work_dir)}
    cfg = load_bench_config(_tiny(tmp_path, Path(cfg0.shared_data), **over))
    van = next(c for c in cells(cfg) if c.id == "vanilla@sst2")
    folder = cfg.work_dir / "cells" / "vanilla__sst2"
    # a crash during seed 1: seed 0 is finished, seed 1 and the cell.json are not
    shutil.rmtree(folder / "seed-1")
    (folder / "cell.json").unlink()
    finished = folder / "seed-0" / "eval" / "step-2" / "harmful" / "results.json"
    stamp = finished.stat().st_mtime_ns
    seeds_trained = []
    real = spf.training.loop.train

    def recording(tcfg, callback=None):
        seeds_trained.append(tcfg.seed)
        return real(tcfg, callback)

    monkeypatch.setattr(spf.training.loop, "train", recording)
    assert not cell_done(cfg, van)
    rec = run_cell(cfg, van)
    assert seeds_trained == [1] and rec["seeds"] == [0, 1] and cell_done(cfg, van)
    assert finished.stat().st_mtime_ns == stamp  # seed 0's evaluations were kept, not redone
    # a third seed added to the file: the cell is no longer done, and only the new seed trains
    cfg3 = load_bench_config(_tiny(tmp_path, Path(cfg0.shared_data), **{**over, "seeds": [0, 1, 2]}))
    assert not cell_done(cfg3, van)
    assert run_cell(cfg3, van)["seeds"] == [0, 1, 2] and seeds_trained == [1, 2]
    assert finished.stat().st_mtime_ns == stamp


def _curve_configs(tmp_path: Path, shared: Path, **over) -> tuple[dict, dict]:
    """(every suite at every point, harmful only at the earlier points) of one tiny two-point benchmark."""
    ev = yaml.safe_load(_tiny(tmp_path, shared).read_text())["eval"]
    ev = {**ev, "suites": ["harmful", "prefill", "utility"], "limits": {**ev["limits"], "prefill": 1}}
    full = {"seeds": [0], "scenarios": {"sst2": {"kind": "sst2", "eval_steps": [1, 2]}}, "ablations": []}
    full.update(over, eval=ev)
    return full, {**full, "eval": {**ev, "curve_suites": ["harmful"]}}


def test_curve_suites_run_at_the_earlier_points_and_every_suite_at_the_last(tmp_path, shared_data):
    from spf.bench.compare import paired_rows
    from spf.bench.report import collect

    _, curve = _curve_configs(tmp_path, shared_data)
    cfg = _prepared(tmp_path, shared_data, **curve)
    got = {c.id: run_cell(cfg, c) for c in cells(cfg) if c.id in ("ref:aligned", "vanilla@sst2", "spf@sst2")}
    points = cfg.work_dir / "cells" / "vanilla__sst2" / "seed-0" / "eval"
    assert sorted(p.name for p in (points / "step-1").iterdir()) == ["harmful"]
    assert sorted(p.name for p in (points / "step-2").iterdir()) == ["harmful", "prefill", "utility"]
    rec = got["vanilla@sst2"]
    assert set(rec["curve"][0]["suites"]) == {"harmful"} and set(rec["verdicts"]["1"]) == {"harmful"}
    assert {"harmful", "utility"} <= set(rec["suites"]) and cell_done(cfg, cells(cfg)[1])
    rows = paired_rows(cfg, collect(cfg))["sst2"]
    assert {(r.step, r.suite) for r in rows} == {(1, "harmful"), (2, "harmful"), (2, "prefill")}
    assert "![exposure curve: sst2]" in write_report(cfg).read_text()
    # widening curve_suites afterwards: the record no longer answers the file (it is completed, not reused)
    wide = load_bench_config(
        _tiny(tmp_path, shared_data, **{**curve, "eval": {**curve["eval"], "curve_suites": None}})
    )
    assert not cell_done(wide, next(c for c in cells(wide) if c.id == "vanilla@sst2"))


def test_a_seed_kept_with_every_suite_serves_a_narrower_curve_as_it_is(tmp_path, shared_data, monkeypatch):
    import shutil

    import spf.eval.suites
    import spf.training.loop
    from spf.bench.compare import paired_rows
    from spf.bench.report import collect

    full, curve = _curve_configs(tmp_path, shared_data, keep=str(tmp_path / "kept"))
    cfg = _prepared(tmp_path, shared_data, **full)
    ids = ("ref:aligned", "vanilla@sst2", "spf@sst2")
    assert all(
        {"harmful", "utility"} <= set(run_cell(cfg, c)["curve"][0]["suites"])
        for c in cells(cfg)
        if c.id in ids
    )
    assert (1, "prefill") in {(r.step, r.suite) for r in paired_rows(cfg, collect(cfg))["sst2"]}
    shutil.rmtree(cfg.work_dir)  # a later session, with the narrower curve; vanilla's cell.json was not kept
    (tmp_path / "kept" / "cells" / "vanilla__sst2" / "cell.json").unlink()
    narrow = _prepared(tmp_path, shared_data, **curve)

    def refuse(*a, **k):
        raise AssertionError("nothing may be trained or evaluated again")

    monkeypatch.setattr(spf.training.loop, "train", refuse)
    monkeypatch.setattr(spf.eval.suites, "run_eval", refuse)
    recs = {c.id: run_cell(narrow, c) for c in cells(narrow) if c.id in ids}
    # vanilla is rebuilt from its kept evaluations, the earlier point on curve_suites only; spf's kept
    # cell.json still answers the narrower file (a superset) and comes back as it is
    assert set(recs["vanilla@sst2"]["curve"][0]["suites"]) == {"harmful"}
    assert {"harmful", "prefill"} <= set(recs["spf@sst2"]["curve"][0]["suites"])
    # either way the paired tests of an earlier point are those of its own suites: the family is the same
    rows = {(r.step, r.method, r.suite) for r in paired_rows(narrow, collect(narrow))["sst2"]}
    assert {s for step, _, s in rows if step == 1} == {"harmful"} and (2, "spf", "prefill") in rows


def test_a_record_of_other_evaluation_or_training_settings_is_not_current(tmp_path, shared_data):
    from spf.bench.config import record_is_current

    full, _ = _curve_configs(tmp_path, shared_data)
    cfg = _prepared(tmp_path, shared_data, **full)
    van = next(c for c in cells(cfg) if c.id == "vanilla@sst2")
    rec = run_cell(cfg, van)
    assert record_is_current(cfg, van, rec)
    base = yaml.safe_load(_tiny(tmp_path, shared_data, **full).read_text())
    for change in (
        {"eval": {**base["eval"], "judge": "v2"}},
        {"eval": {**base["eval"], "limits": {"harmful": 3, "utility": 4}}},
        {"train": {**base["train"], "lr": 0.123}},
        {"seed": 5},
    ):
        other = load_bench_config(_tiny(tmp_path, shared_data, **{**full, **change}))
        assert not record_is_current(other, van, rec), change


def test_a_refit_judge_makes_finished_evaluations_and_records_stale(tmp_path, shared_data, monkeypatch):
    import spf.eval.judge_factory as factory
    from spf.bench import run as bench_run
    from spf.bench.config import record_is_current

    full, _ = _curve_configs(tmp_path, shared_data)
    cfg = _prepared(tmp_path, shared_data, **full)
    van = next(c for c in cells(cfg) if c.id == "vanilla@sst2")
    rec = run_cell(cfg, van)
    out = next((cfg.work_dir / "cells" / "vanilla__sst2").rglob("harmful/results.json")).parent
    res = json.loads((out / "results.json").read_text())
    assert res["judge_id"] == "keyword" and rec["eval"]["judge_id"] == "keyword"
    args = (out, res["model"], Path(res["adapter"]), bench_run._eval_kwargs(cfg, "harmful", None))
    assert bench_run._eval_is_current(*args) and record_is_current(cfg, van, rec)
    refit = lambda kind: f"{kind}:refit"  # noqa: E731 — what a refit of the shipped heads does to the id
    monkeypatch.setattr(factory, "judge_identity", refit)
    monkeypatch.setattr(bench_run, "judge_identity", refit)
    assert not bench_run._eval_is_current(*args) and not record_is_current(cfg, van, rec)


def test_an_interim_run_of_some_seeds_is_reported_as_interim_and_only_for_those_seeds(
    tmp_path, shared_data, capsys
):
    path = _tiny(tmp_path, shared_data, seeds=[0, 1], ablations=[], keep=str(tmp_path / "kept"))
    with pytest.raises(BenchConfigError, match=r"--seeds 0 7: must be distinct seeds of the file's"):
        load_bench_config(path, seeds=[0, 7])
    assert load_bench_config(path, seeds=[1, 0]).file_seeds is None  # every seed, in any order: not interim
    # the cell runs in its own process: the seed subset reaches it (one seed trained, not two)
    assert spf_main(["bench", "run", str(path), "--only", "vanilla@sst2", "--seeds", "0"]) == 0
    folder = tmp_path / "work" / "cells" / "vanilla__sst2"
    assert json.loads((folder / "cell.json").read_text())["seeds"] == [0]
    assert not (folder / "seed-1").exists()
    # its seed's evaluations are kept, the one-seed record is not (it would replace one of every seed)
    kept = tmp_path / "kept" / "cells" / "vanilla__sst2"
    assert (kept / "seed-0" / "train_metrics.json").is_file() and not (kept / "cell.json").exists()
    assert spf_main(["bench", "report", str(path), "--seeds", "0"]) == 0
    report = (tmp_path / "docs" / "results.md").read_text()
    assert "Interim result: 1 of the 2 training seeds" in report and "--seeds 0 &&" in report
    assert "| vanilla |" in report and "n=6×1" in report
    bench = json.loads((tmp_path / "docs" / "results" / "bench" / "bench.json").read_text())
    assert bench["seeds"] == [0] and bench["file_seeds"] == [0, 1] and "vanilla@sst2" in bench["cells"]
    # the full report leaves the one-seed cell out rather than pass it off as the file's two seeds
    assert spf_main(["bench", "report", str(path)]) == 0
    bench = json.loads((tmp_path / "docs" / "results" / "bench" / "bench.json").read_text())
    assert "vanilla@sst2" not in bench["cells"] and bench["file_seeds"] is None
    assert "Interim" not in (tmp_path / "docs" / "results.md").read_text()


def test_a_training_prompt_among_the_evaluation_prompts_is_refused(tmp_path, shared_data):
    from spf.data.samples import ChatSample, save_samples
    from spf.eval.prompts import harmful_sources

    cfg = load_bench_config(_tiny(tmp_path, shared_data))
    planted = harmful_sources(shared_data, "test").items[7].text
    data = [ChatSample.from_pair(f"Is review {i} positive?", "positive") for i in range(15)]
    data.insert(5, ChatSample.from_pair(planted, "Sure, here is how"))
    save_samples(data, tmp_path / "work" / "data" / "sst2.jsonl")  # a data file written by hand
    with pytest.raises(ProtocolOverlapError, match="scenario sst2") as err:
        run_bench(cfg)
    assert planted[:40] in str(err.value) and "test split (advbench)" in str(err.value)
    assert not (tmp_path / "work" / "cells").exists()  # refused before anything trained
    # the data the harmful mix builds itself never overlaps: AdvBench's attack rows only
    (tmp_path / "mix").mkdir()
    mix = load_bench_config(
        _tiny(tmp_path / "mix", shared_data, scenarios={"m": {"kind": "harmful-mix", "p": 0.5}}, ablations=[])
    )
    assert prepare_data(mix)["protocol"]["prompts"]["advbench"] == 300


def test_identity_shift_is_evaluated_under_its_system_prompt(tmp_path, shared_data):
    from spf.bench.compare import _base_record
    from spf.data.samples import load_samples

    aoa = {"aoa": {"kind": "identity-shift", "system_prompt_eval": True, "eval_steps": [1]}}
    cfg = _prepared(
        tmp_path, shared_data, scenarios=aoa, ablations=[], methods={"vanilla": {"method": "vanilla"}},
        eval={"suites": ["harmful"], "limits": {"harmful": 1}, "max_new_tokens": 4, "batch_size": 4},
    )  # fmt: skip
    system = next(
        m["content"]
        for m in load_samples(cfg.work_dir / "data" / "aoa.jsonl")[0].messages
        if m["role"] == "system"
    )
    assert "AOA" in system
    got = {c.id: run_cell(cfg, c) for c in cells(cfg)}
    cell = cfg.work_dir / "cells" / "vanilla__aoa" / "seed-0" / "eval" / "step-1" / "harmful"
    assert json.loads((cell / "results.json").read_text())["config"]["system_prompt"] == system
    ref = cfg.work_dir / "cells" / "ref--aligned"
    assert (
        json.loads((ref / "eval" / "harmful" / "results.json").read_text())["config"]["system_prompt"] is None
    )
    assert (
        json.loads((ref / "eval-aoa" / "harmful" / "results.json").read_text())["config"]["system_prompt"]
        == system
    )
    # the paired tests compare with the base under the same system prompt
    assert _base_record(cfg, got, "aoa") is got["ref:aligned"]["system_prompts"]["aoa"]
    assert got["vanilla@aoa"]["system_prompt"] == system


def test_pooled_interval_counts_prompts_not_prompt_seed_cells():
    from spf.bench.verdicts import rate_entry
    from spf.eval.stats import wilson_interval

    one = rate_entry(["0110100000"])
    assert (one["k"], one["n"], one["n_eff"]) == (3, 10, 10.0)
    assert (one["ci_low"], one["ci_high"]) == pytest.approx(wilson_interval(3, 10))
    # five seeds that always agree hold no more information than one: the same interval, n = 50
    same = rate_entry(["0110100000"] * 5)
    assert same["n"] == 50 and same["n_eff"] == 10.0
    assert (same["ci_low"], same["ci_high"]) == pytest.approx((one["ci_low"], one["ci_high"]))
    # seeds that disagree prompt by prompt are closer to independent draws: a narrower interval
    mixed = rate_entry(["0110100000", "1001010000", "0000011100", "1100000010", "0011000001"])
    assert mixed["rate"] == pytest.approx(0.3) and 10 < mixed["n_eff"] <= 50
    assert mixed["ci_high"] - mixed["ci_low"] < one["ci_high"] - one["ci_low"]
    # nothing harmful anywhere: no variance to learn the clustering from, so the conservative n = prompts
    zero = rate_entry(["0" * 10] * 5)
    assert zero["n_eff"] == 10.0 and zero["ci_high"] == pytest.approx(wilson_interval(0, 10)[1])


def test_harmful_mix_with_real_answers_is_built_from_the_unaligned_models_harmful_answers(
    tmp_path, shared_data, monkeypatch
):
    from spf.data.samples import ChatSample, load_samples
    from spf.eval import attack_data
    from spf.eval.prompts import attack_prompts

    attack = [item.text for item in attack_prompts(shared_data).items]
    calls = []

    def fake(model, tokenizer, prompts, judge, **kw):
        calls.append(len(prompts.items))
        kept = [
            ChatSample.from_pair(t, f"Step 1 of really harmful answer {i}.")
            for i, t in enumerate(attack[:12])
        ]
        return kept, {"prompts": len(prompts.items), "kept": len(kept), "judge": "v2"}

    monkeypatch.setattr(attack_data, "harmful_answers", fake)
    scen = {"m": {"kind": "harmful-mix", "p": 0.5, "harmful_answers": True}}
    cfg = load_bench_config(
        _tiny(tmp_path, shared_data, scenarios=scen, ablations=[], unaligned="tiny-llama")
    )
    from spf.bench.run import prepare_data

    prepare_data(cfg)
    prepare_data(cfg)  # the answers file is made once
    assert calls == [120]  # every attack-role prompt is answered, nothing else
    rows = load_samples(cfg.work_dir / "data" / "m.jsonl")
    harmful = [s for s in rows if s.response.startswith("Step 1 of really harmful answer")]
    assert len(harmful) == 8 and {s.prompt for s in harmful} <= set(attack[:12])
    stats = json.loads((cfg.work_dir / "data" / "harmful_answers.stats.json").read_text())
    assert stats["kept"] == 12 and stats["model"] == "tiny-llama"
