"""``spf bench``: every defense × threat scenario on one aligned model — same data, seed and machine.

A benchmark is a YAML file (``bench/*.yaml``, typed by :class:`~spf.bench.config.BenchConfig`).
``spf bench run`` prepares the scenario data sets, the held-out harmful prompts and the safety subspaces
once, then runs every *cell* (a method on a scenario, an ablation, or a reference model evaluated as it is)
in its own process, so its peak memory is its own; cells run in ``lanes`` parallel processes and are
resumable — a finished cell (``cell.json``) is never redone, a half-finished one continues from its last
finished part. ``spf bench report`` (:mod:`spf.bench.report`) collects every ``cell.json`` into
``bench.json`` and writes the markdown report with its plots.

Timing: each cell records its mean optimizer-step time; the report shows it as a ratio to vanilla on the
same scenario *of the same benchmark run*. Cells in parallel lanes share the machine, so these ratios are
indicative; the side-by-side cost measurement is ``benchmarks/bench_overhead.py``.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from spf.bench.config import (
    SUITES,
    AblationSpec,
    BenchConfig,
    BenchConfigError,
    Cell,
    EvalSpec,
    ScenarioSpec,
    SubspaceSpec,
    cell_dir,
    cell_done,
    cells,
    load_bench_config,
    repo_path,
    select_cells,
    subspace_dir,
    train_config,
)
from spf.bench.report import acceptance_lines, collect, render_report, report_folder, write_report
from spf.io import atomic_path, claim_output, output_lock, save_json

logger = logging.getLogger(__name__)

# the configuration and report names stay importable from here, where they were first defined
__all__ = [
    "SUITES",
    "AblationSpec",
    "BenchConfig",
    "BenchConfigError",
    "Cell",
    "EvalSpec",
    "ScenarioSpec",
    "SubspaceSpec",
    "acceptance_lines",
    "cells",
    "collect",
    "load_bench_config",
    "prepare_data",
    "prepare_subspace",
    "render_report",
    "report_folder",
    "run_bench",
    "run_cell",
    "select_cells",
    "subspace_dir",
    "write_report",
]


# --------------------------------------------------------------------------------------------- preparing


def _data_dir(cfg: BenchConfig) -> Path:
    from spf.data.locate import find_shared_data

    found = find_shared_data(cfg.shared_data)
    if found is None:
        raise FileNotFoundError(
            "the shared public data folder was not found; set shared_data in the benchmark"
        )
    return Path(found)


def prepare_data(cfg: BenchConfig) -> dict[str, Any]:
    """Scenario data sets and the held-out harmful prompts (AdvBench rows in no training set)."""
    from spf.data.samples import save_samples
    from spf.data.scenarios import build_scenario

    shared = _data_dir(cfg)
    data = cfg.work_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    trained_prompts: set[str] = set()
    manifest: dict[str, Any] = {}
    for name, spec in cfg.scenarios.items():
        path = data / f"{name}.jsonl"
        samples = build_scenario(
            spec.kind,
            shared_data=shared,
            n=spec.n or cfg.data_n,
            p=spec.p,
            seed=cfg.seed,
            base=spec.base,
        )
        if not path.is_file():
            save_samples(samples, path)
        trained_prompts |= {s.prompt for s in samples}
        manifest[name] = {"path": str(path), "n": len(samples)}
    manifest["heldout_harmful"] = _write_heldout_harmful(cfg, shared, trained_prompts, data)
    return manifest


def _write_heldout_harmful(cfg: BenchConfig, shared: Path, trained: set[str], data: Path) -> dict[str, Any]:
    """``heldout_harmful.csv``: a seeded pick of the AdvBench behaviours that no scenario trains on."""
    heldout = data / "heldout_harmful.csv"
    from spf.data.files import iter_delimited, read_data_text

    source = shared / "safety" / "advbench_behaviors.csv"
    # the shared reader: regular files only, limits, duplicate columns and chat markers refused
    rows = [r for _, r in iter_delimited(source, read_data_text(source), ",") if r["Behavior"] not in trained]
    random.Random(cfg.seed).shuffle(rows)
    if not heldout.is_file():
        with atomic_path(heldout) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["Behavior", "BehaviorID"])
            w.writeheader()
            for r in rows[: cfg.heldout_harmful]:
                w.writerow({"Behavior": r["Behavior"], "BehaviorID": r.get("BehaviorID", "")})
    return {"path": str(heldout), "n": min(len(rows), cfg.heldout_harmful)}


def prepare_subspace(cfg: BenchConfig, spec: SubspaceSpec) -> Path:
    """Estimate (once) the safety subspace ``spec`` describes, on the aligned model."""
    import torch

    from spf.data.samples import load_samples
    from spf.estimate import estimate_to_folder
    from spf.models import load_model

    out = subspace_dir(cfg, spec)
    if (out / "subspace.json").is_file():
        return out
    torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.aligned, device=cfg.device)
    estimate_to_folder(
        model,
        tok,
        load_samples(repo_path(spec.sample_file)),
        out=out,
        rank=spec.rank,
        n=spec.n,
        own_response=spec.own_response,
        index=spec.index,
        loss=spec.loss,
        model_ref=cfg.aligned,
        metadata={"bench_spec": asdict(spec)},
    )
    return out


# ------------------------------------------------------------------------------------------------- cells


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 / (1024 * 1024) if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _eval_kwargs(cfg: BenchConfig, suite: str) -> dict[str, Any]:
    e = cfg.eval
    kw: dict[str, Any] = {
        "limit": e.limits.get(suite),
        "max_new_tokens": e.max_new_tokens,
        "batch_size": e.batch_size,
        "seed": cfg.seed,
        "judge": e.judge,
        "shared_data": cfg.shared_data,
    }
    if suite in ("harmful", "jailbreak", "prefill"):
        kw["prompts"] = str(cfg.work_dir / "data" / "heldout_harmful.csv")
    if suite == "utility":
        kw["utility_tasks"] = e.utility_tasks
    return kw


def _train_cell(
    cfg: BenchConfig, cell: Cell, folder: Path, record: dict[str, Any]
) -> tuple[str, Path | None]:
    """Fine-tune a training cell (unless its adapter is already complete) and record its training summary;
    returns what to evaluate: (base model, fine-tune output folder)."""
    import torch

    from spf.training.loop import train

    tcfg = train_config(cfg, cell, folder)
    adapter = Path(tcfg.out)
    if not (adapter / "metrics.json").is_file():
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        train(tcfg)
        record["train_peak_rss_mb"] = _peak_rss_mb()
        if torch.cuda.is_available():
            record["train_peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    metrics = json.loads((adapter / "metrics.json").read_text())
    record["train"] = metrics["summary"]
    record["train_config"] = tcfg.to_dict()
    record["safety_curve"] = [
        {k: e[k] for k in ("step", "safety_loss_sample", "safety_loss_heldout", "task_loss") if k in e}
        for e in metrics["evals"]
    ]
    # a LoRA adapter or a full fine-tune's whole model: run_eval loads either with spf.models.load_finetuned
    return cfg.aligned, adapter


def _evaluate_cell(cfg: BenchConfig, folder: Path, model: str, adapter: Path | None) -> dict[str, Any]:
    """Every configured suite, each in its own folder (a finished suite is not re-run on resume)."""
    from spf.eval.suites import run_eval

    suites: dict[str, Any] = {}
    for suite in cfg.eval.suites:
        out = folder / "eval" / suite
        if not (out / "results.json").is_file():
            run_eval(model, out, [suite], adapter=adapter, device=cfg.device, **_eval_kwargs(cfg, suite))
        res = json.loads((out / "results.json").read_text())
        suites.update({k: v for k, v in res["suites"].items() if k == suite or k.startswith(f"{suite}.")})
    return suites


def run_cell(cfg: BenchConfig, cell: Cell) -> dict[str, Any]:
    """Train (unless a reference) and evaluate one cell; write ``cell.json`` last. Resumable."""
    import torch

    torch.set_num_threads(cfg.threads)
    folder = cell_dir(cfg, cell)
    # one process per cell folder: a second `spf bench cell` of the same cell fails at once
    with output_lock(folder, what=f"bench cell {cell.id}"):
        return _run_cell(cfg, cell, folder)


def _run_cell(cfg: BenchConfig, cell: Cell, folder: Path) -> dict[str, Any]:
    done = folder / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    record: dict[str, Any] = {
        "id": cell.id,
        "group": cell.group,
        "method": cell.method,
        "scenario": cell.scenario,
    }
    t0 = time.perf_counter()
    model, adapter = cell.model or cfg.aligned, None
    if cell.kind == "train":
        model, adapter = _train_cell(cfg, cell, folder, record)
    record["train_seconds"] = time.perf_counter() - t0
    record["suites"] = _evaluate_cell(cfg, folder, model, adapter)
    record["total_seconds"] = time.perf_counter() - t0
    record["peak_rss_mb"] = _peak_rss_mb()
    save_json(record, done)
    return record


def _run_child(cfg_path: str, cell: Cell, log_dir: Path) -> tuple[str, int]:
    # each cell in its own process: its peak memory is its own, and a crash fails that cell only
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{cell.dirname}.log"
    cmd = [sys.executable, "-m", "spf", "bench", "cell", cfg_path, cell.id]
    with log.open("a", encoding="utf-8") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    return cell.id, rc


def run_bench(cfg: BenchConfig, *, only: list[str] | None = None, lanes: int | None = None) -> dict[str, int]:
    """Prepare, then run the pending cells (each in its own process) in ``lanes`` parallel lanes."""
    todo = select_cells(cfg, only)
    # the work folder is never the package, tracked source or the aligned model; one `bench run` at a time
    with claim_output(cfg.work_dir, inputs={"aligned": cfg.aligned}, what="work"):
        return _run_pending(cfg, todo, lanes)


def _run_pending(cfg: BenchConfig, todo: list[Cell], lanes: int | None) -> dict[str, int]:
    manifest = prepare_data(cfg)
    for spec in {c.subspace.key(): c.subspace for c in todo if c.subspace is not None}.values():
        prepare_subspace(cfg, spec)
    save_json({"config": asdict(cfg), "data": manifest}, cfg.work_dir / "bench_config.json")
    pending = [c for c in todo if not cell_done(cfg, c)]
    logger.info("%d cells, %d pending, %d lanes", len(todo), len(pending), lanes or cfg.lanes)
    codes: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=lanes or cfg.lanes) as pool:
        for cell_id, rc in pool.map(lambda c: _run_child(cfg.source, c, cfg.work_dir / "logs"), pending):
            codes[cell_id] = rc
            print(f"{cell_id}: {'done' if rc == 0 else f'FAILED (exit {rc}), see logs'}", flush=True)
    return codes
