"""``spf bench``: every defense × threat scenario on one aligned model — same data, seed and machine.

A benchmark is a YAML file (``bench/*.yaml``, typed by :class:`~spf.bench.config.BenchConfig`).
``spf bench run`` prepares the scenario data sets and the safety subspaces once, checks that no training
prompt is an evaluation prompt, then runs every *cell* (a method on a scenario, an ablation, or a reference
model evaluated as it is) in its own process, so its peak memory is its own; cells run in ``lanes``
parallel processes and are resumable — a finished cell (``cell.json``) is never redone, a half-finished
one continues from its last finished seed and suite.

Protocol: a training cell runs once per training seed (``seeds``: data order and LoRA init), each to the
last step of its scenario's exposure curve (``eval_steps``) with a snapshot at every other point; every
point of every seed is evaluated on the project's protocol prompts (``eval.split`` of AdvBench, XSTest and
our own held-out sets; the earlier points on ``eval.curve_suites`` only, the last on every suite), sampled
with the benchmark's fixed ``seed``, so verdicts pair prompt by prompt across seeds and cells.
``cell.json`` holds the pooled rates (``suites``, ``curve``) and the per-prompt verdicts (``verdicts``)
that the report's paired tests read. ``spf bench report``
(:mod:`spf.bench.report`) collects every ``cell.json`` into ``bench.json`` and writes the markdown report
with its plots.

Timing: each cell records its mean optimizer-step time; the report shows it as a ratio to vanilla on the
same scenario *of the same benchmark run*. Cells in parallel lanes share the machine, so these ratios are
indicative; the side-by-side cost measurement is ``benchmarks/bench_overhead.py``.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
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
    cell_steps,
    cells,
    eval_record,
    load_bench_config,
    point_suites,
    record_is_current,
    repo_path,
    seed_dir,
    seed_list,
    select_cells,
    subspace_dir,
    system_prompt_scenarios,
    train_config,
    train_key,
)
from spf.bench.keep import Keep
from spf.bench.report import acceptance_lines, collect, render_report, report_folder, write_report
from spf.bench.verdicts import SuiteVerdicts, pool_suite, read_verdicts
from spf.eval.judge_factory import judge_identity
from spf.io import claim_output, output_lock, save_json
from spf.training.config import shown

logger = logging.getLogger(__name__)

# the configuration and report names stay importable from here, where they were first defined
__all__ = [
    "SUITES",
    "AblationSpec",
    "BenchConfig",
    "BenchConfigError",
    "Cell",
    "EvalSpec",
    "ProtocolOverlapError",
    "ScenarioSpec",
    "SubspaceSpec",
    "acceptance_lines",
    "cells",
    "check_protocol",
    "collect",
    "load_bench_config",
    "prepare_data",
    "prepare_subspace",
    "render_report",
    "report_folder",
    "run_bench",
    "run_cell",
    "scenario_system_prompt",
    "select_cells",
    "subspace_dir",
    "write_report",
]


# --------------------------------------------------------------------------------------------- preparing


class ProtocolOverlapError(ValueError):
    """A training set holds an evaluation prompt: that prompt would measure memory, not safety."""


def _data_dir(cfg: BenchConfig) -> Path:
    from spf.data.locate import find_shared_data

    found = find_shared_data(cfg.shared_data)
    if found is None:
        raise FileNotFoundError(
            "the shared public data folder was not found; set shared_data in the benchmark"
        )
    return Path(found)


def prepare_data(cfg: BenchConfig) -> dict[str, Any]:
    """The scenario data sets (written once), then the protocol check: no training prompt of any scenario
    is an evaluation prompt, and a scenario evaluated under its system prompt has one."""
    from spf.data.samples import save_samples
    from spf.data.scenarios import build_scenario

    shared = _data_dir(cfg)
    data = cfg.work_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    for name, spec in cfg.scenarios.items():
        path = data / f"{name}.jsonl"
        if not path.is_file():
            answers = _harmful_answers_file(cfg, shared) if spec.harmful_answers else None
            samples = build_scenario(
                spec.kind,
                shared_data=shared,
                n=spec.n or cfg.data_n,
                p=spec.p,
                seed=cfg.seed,
                base=spec.base,
                answers=answers,
            )
            save_samples(samples, path)
        manifest[name] = {
            "path": str(path),
            "n": sum(1 for line in path.open(encoding="utf-8") if line.strip()),
        }
    manifest["protocol"] = check_protocol(cfg, shared)
    for name in system_prompt_scenarios(cfg):
        scenario_system_prompt(cfg, name)  # fails now, not after the first cell's training
    return manifest


def _harmful_answers_file(cfg: BenchConfig, shared: Path) -> Path:
    """``data/harmful_answers.jsonl`` (made once): the unaligned model's own answers to the attack-role
    prompts that judge v2 marks harmful, with their provenance in ``harmful_answers.stats.json``."""
    from spf.data.samples import save_samples
    from spf.eval.attack_data import harmful_answers
    from spf.eval.judge_factory import make_judge
    from spf.eval.prompts import attack_prompts
    from spf.models import load_model

    path = cfg.work_dir / "data" / "harmful_answers.jsonl"
    if path.is_file():
        return path
    if not cfg.unaligned:
        raise BenchConfigError(f"{cfg.source}: harmful_answers needs `unaligned` (the model that answers)")
    model, tokenizer = load_model(cfg.unaligned, device=cfg.device)
    kept, stats = harmful_answers(model, tokenizer, attack_prompts(shared), make_judge("v2"))
    save_json({**stats, "model": cfg.unaligned}, path.with_suffix(".stats.json"))
    save_samples(kept, path)  # last: its presence means both files are complete
    return path


def _evaluation_prompts(cfg: BenchConfig, shared: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Every prompt the safety suites may draw (all of the split, whatever the limits) → its source."""
    from spf.eval.prompts import harmful_sources, overrefusal_sources

    split = cfg.eval.split
    items = [*harmful_sources(shared, split).items, *overrefusal_sources(shared, split).items]
    counts: dict[str, int] = {}
    for item in items:
        counts[item.source or "?"] = counts.get(item.source or "?", 0) + 1
    return {item.text.strip(): item.source or "?" for item in items}, counts


def check_protocol(cfg: BenchConfig, shared: Path) -> dict[str, Any]:
    """Refuse (:class:`ProtocolOverlapError`) a scenario whose training data (the file the cells train on)
    holds an evaluation prompt; return the protocol's prompt counts for the manifest. The harmful mix
    draws only AdvBench rows of the attack role (spf.data.splits), so this holds by construction — the
    check is there for a data file written by hand or by an older version."""
    from spf.data.samples import load_samples

    prompts, counts = _evaluation_prompts(cfg, shared)
    for name in cfg.scenarios:
        path = cfg.work_dir / "data" / f"{name}.jsonl"
        for sample in load_samples(path):
            for m in sample.messages:
                text = m["content"].strip()
                if m["role"] == "user" and text in prompts:
                    raise ProtocolOverlapError(
                        f"scenario {name} ({path}) trains on an evaluation prompt of the {cfg.eval.split} "
                        f"split ({prompts[text]}): {shown(text)}; remove it from the data, or the benchmark "
                        "measures recall of its training set"
                    )
    return {"split": cfg.eval.split, "prompts": counts, "seed": cfg.seed}


def scenario_system_prompt(cfg: BenchConfig, scenario: str) -> str:
    """The system message of a scenario's training conversations (the AOA identity-shift prompt)."""
    from spf.data.samples import load_samples

    path = cfg.work_dir / "data" / f"{scenario}.jsonl"
    found = {m["content"] for s in load_samples(path) for m in s.messages if m["role"] == "system"}
    if len(found) != 1:
        raise BenchConfigError(
            f"{cfg.source}: scenarios.{scenario}.system_prompt_eval: needs one system prompt in its training "
            f"conversations ({path}), found {len(found)}"
        )
    return found.pop()


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
    scale = 1 / (1024 * 1024) if sys.platform == "darwin" else 1 / 1024  # ru_maxrss: KiB on Linux, B on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _eval_kwargs(cfg: BenchConfig, suite: str, system_prompt: str | None) -> dict[str, Any]:
    """run_eval's settings: no ``prompts`` (the protocol's own sources of ``split``), sampled with the
    benchmark's fixed ``seed`` — never a training seed — so every cell and seed sees the same prompts."""
    e = cfg.eval
    kw: dict[str, Any] = {
        "limit": e.limits.get(suite),
        "max_new_tokens": e.max_new_tokens,
        "batch_size": e.batch_size,
        "seed": cfg.seed,
        "judge": e.judge,
        "shared_data": cfg.shared_data,
        "split": e.split,
        "system_prompt": system_prompt,
    }
    if suite == "utility":
        kw["utility_tasks"] = e.utility_tasks
    return kw


def _eval_is_current(out: Path, model: str, adapter: Path | None, kw: dict[str, Any]) -> bool:
    """A finished evaluation of these settings: one of another protocol (an older benchmark's prompts
    file, another judge, split or system prompt) is redone, not paired with the new ones."""
    try:
        res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    c = res.get("config", {})
    same = {k: c.get(k) for k in ("limit", "max_new_tokens", "seed", "split", "system_prompt", "prompts")}
    want = {**{k: kw.get(k) for k in same}, "prompts": None}
    judged = res.get("judge") is None or res.get("judge_id") == judge_identity(kw["judge"])
    where = (res.get("model"), res.get("adapter")) == (model, str(adapter) if adapter is not None else None)
    return same == want and judged and where


def _keep(cfg: BenchConfig) -> Keep | None:
    return None if cfg.keep is None else Keep(cfg.keep, cfg.work_dir, cfg.aligned)


def _eval_available(
    keep: Keep | None, out: Path, model: str, adapter: Path | None, kw: dict[str, Any]
) -> bool:
    """A current evaluation in ``out``, or one restored there from the kept copy."""
    if _eval_is_current(out, model, adapter, kw):
        return True
    return keep is not None and keep.restore_eval(out) and _eval_is_current(out, model, adapter, kw)


def _evals_done(
    cfg: BenchConfig, folder: Path, model: str, adapter: Path, system: str | None, suites: list[str]
) -> bool:
    """Every suite of one evaluation point is finished here or in the kept copy (restored if so)."""
    keep = _keep(cfg)
    return all(
        _eval_available(keep, folder / suite, model, adapter, _eval_kwargs(cfg, suite, system))
        for suite in suites
    )


def _kept_seed(
    cfg: BenchConfig, cell: Cell, seed: int, steps: list[int], system: str | None
) -> tuple[Any, dict[str, Any]] | None:
    """A seed's training config and metrics when every one of its evaluations is already finished (kept
    from an earlier session): the seed is then not trained again. None = train it."""
    from spf.training.checkpoint import snapshot_dir

    keep = _keep(cfg)
    if keep is None:
        return None
    tcfg = train_config(cfg, cell, seed_dir(cfg, cell, seed), seed)
    kept = keep.load_json(seed_dir(cfg, cell, seed) / "train_metrics.json")
    if kept is None or kept.get("result_key") != train_key(tcfg.to_dict()):
        return None
    out = Path(tcfg.out)
    for step in steps:
        output = out if step == steps[-1] else snapshot_dir(out, step)
        point = seed_dir(cfg, cell, seed) / "eval" / f"step-{step}"
        if not _evals_done(cfg, point, cfg.aligned, output, system, point_suites(cfg, step, steps)):
            return None
    return tcfg, kept["metrics"]


def _evaluate(
    cfg: BenchConfig,
    folder: Path,
    model: str,
    adapter: Path | None,
    system_prompt: str | None,
    suites: list[str] | None = None,
) -> dict[str, tuple[dict[str, Any], SuiteVerdicts]]:
    """The ``suites`` (None = every configured one) of one model (a fine-tune output, a reference), each in
    its own folder (a finished suite is not re-run on resume): ``{suite entry: (result, verdicts)}``."""
    from spf.eval.suites import run_eval

    got: dict[str, tuple[dict[str, Any], SuiteVerdicts]] = {}
    keep = _keep(cfg)
    for suite in cfg.eval.suites if suites is None else suites:
        out, kw = folder / suite, _eval_kwargs(cfg, suite, system_prompt)
        if not _eval_available(keep, out, model, adapter, kw):
            run_eval(model, out, [suite], adapter=adapter, device=cfg.device, **kw)
            if keep is not None:
                keep.save_eval(out)
        elif keep is not None and not keep.has_eval(out):
            keep.save_eval(out)
        res = json.loads((out / "results.json").read_text())["suites"]
        verdicts = read_verdicts(out)
        mine = [k for k in res if (k == suite or k.startswith(f"{suite}.")) and k in verdicts]
        got.update({k: (res[k], verdicts[k]) for k in mine})
    return got


Evaluations = dict[int, dict[int, dict[str, tuple[dict[str, Any], SuiteVerdicts]]]]  # step → seed → suite


def _add_curve(record: dict[str, Any], evals: Evaluations) -> None:
    """``seeds``, ``steps``, the pooled ``curve``, ``suites`` (its last step), the per-prompt ``verdicts``."""
    curve, verdicts = [], {}
    for step, by_seed in evals.items():
        suites, verdicts[str(step)] = {}, {}
        for key in next(iter(by_seed.values())):
            pooled = pool_suite(
                key,
                {s: got[key][1] for s, got in by_seed.items()},
                {s: got[key][0] for s, got in by_seed.items()},
            )
            suites[key], verdicts[str(step)][key] = pooled
        curve.append({"step": step, "suites": suites})
    record.update(
        seeds=list(next(iter(evals.values()))),
        steps=list(evals),
        curve=curve,
        suites=curve[-1]["suites"],
        verdicts=verdicts,
    )


def _pooled_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The seeds' training summaries as one: a value all share, else their mean (numbers), else seed 1's."""
    out: dict[str, Any] = {}
    for key, first in summaries[0].items():
        values = [s.get(key) for s in summaries]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        out[key] = first if all(v == first for v in values) or not numeric else sum(values) / len(values)
    return out


def _mean_safety_curve(curves: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    keys = ("safety_loss_sample", "safety_loss_heldout", "task_loss")
    out = []
    for points in zip(*curves, strict=False):  # every seed evaluates at the same steps
        row: dict[str, Any] = {"step": points[0]["step"]}
        for k in keys:
            if all(k in p for p in points):
                row[k] = sum(p[k] for p in points) / len(points)
        out.append(row)
    return out


def _train_seed(
    cfg: BenchConfig, cell: Cell, seed: int, record: dict[str, Any]
) -> tuple[Path, dict[str, Any]]:
    """Fine-tune one seed of a training cell unless its output (and every snapshot) is there and of this
    configuration; returns the output folder and its ``metrics.json``."""
    import torch

    from spf.training.checkpoint import result_key, snapshot_dir
    from spf.training.loop import train

    folder = seed_dir(cfg, cell, seed)
    tcfg = train_config(cfg, cell, folder, seed)
    out = Path(tcfg.out)
    want = train_key(tcfg.to_dict())
    saved = out / "train_config.json"
    finished = (
        (out / "metrics.json").is_file()
        and saved.is_file()
        and result_key(json.loads(saved.read_text(encoding="utf-8"))) == want
        and all((snapshot_dir(out, s) / "train_config.json").is_file() for s in tcfg.snapshot_steps)
    )
    if not finished:
        shutil.rmtree(folder / "eval", ignore_errors=True)  # evaluations of weights about to be replaced
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train(tcfg)
        record["train_seconds"] = record.get("train_seconds", 0.0) + time.perf_counter() - t0
        record.setdefault("train_peak_rss_mb", _peak_rss_mb())
        if torch.cuda.is_available():
            record["train_peak_cuda_mb"] = max(
                record.get("train_peak_cuda_mb", 0.0), torch.cuda.max_memory_allocated() / 2**20
            )
    if seed == seed_list(cfg)[0]:
        record["train_config"] = tcfg.to_dict()  # the other seeds differ in `seed` and `out` only
    metrics = json.loads((out / "metrics.json").read_text())
    keep = _keep(cfg)
    if keep is not None:
        keep.save_json({"result_key": want, "metrics": metrics}, folder / "train_metrics.json")
    return out, metrics


def _run_training_cell(cfg: BenchConfig, cell: Cell, record: dict[str, Any]) -> None:
    """Every seed: train once to the last step of the curve, then evaluate each snapshot and the final
    output (a LoRA adapter or a full fine-tune; run_eval loads either with spf.models.load_finetuned)."""
    from spf.training.checkpoint import snapshot_dir

    assert cell.scenario is not None
    steps = cell_steps(cfg, cell)
    system = (
        scenario_system_prompt(cfg, cell.scenario)
        if cfg.scenarios[cell.scenario].system_prompt_eval
        else None
    )
    evals: Evaluations = {step: {} for step in steps}
    metrics: dict[int, dict[str, Any]] = {}
    record["train_seconds"] = 0.0
    for seed in seed_list(cfg):
        kept = _kept_seed(cfg, cell, seed, steps, system)
        if kept is None:
            out, metrics[seed] = _train_seed(cfg, cell, seed, record)
        else:  # every evaluation of this seed was kept: no weights are needed
            logger.info("%s seed %d: evaluations kept from an earlier run, not retrained", cell.id, seed)
            tcfg, metrics[seed] = kept
            out = Path(tcfg.out)
            if seed == seed_list(cfg)[0]:
                record["train_config"] = tcfg.to_dict()
        for step in steps:
            output = out if step == steps[-1] else snapshot_dir(out, step)
            point = seed_dir(cfg, cell, seed) / "eval" / f"step-{step}"
            got = _evaluate(cfg, point, cfg.aligned, output, system, point_suites(cfg, step, steps))
            evals[step][seed] = got
    record["system_prompt"] = system
    record["train"] = _pooled_summary([m["summary"] for m in metrics.values()])
    record["train_by_seed"] = {str(s): m["summary"] for s, m in metrics.items()}
    record["safety_curve"] = _mean_safety_curve([m["evals"] for m in metrics.values()])
    _add_curve(record, evals)


def _run_reference_cell(cfg: BenchConfig, cell: Cell, record: dict[str, Any]) -> None:
    """A reference model evaluated as it is (greedy decoding: once, its verdicts stand for every seed), also
    under each scenario's system prompt that a scenario is evaluated with (``system_prompts``)."""
    folder, model = cell_dir(cfg, cell), cell.model or cfg.aligned
    _add_curve(record, {0: {cfg.seed: _evaluate(cfg, folder / "eval", model, None, None)}})
    record["system_prompts"] = {}
    for name in system_prompt_scenarios(cfg):
        system = scenario_system_prompt(cfg, name)
        sub: dict[str, Any] = {"system_prompt": system}
        _add_curve(sub, {0: {cfg.seed: _evaluate(cfg, folder / f"eval-{name}", model, None, system)}})
        record["system_prompts"][name] = sub


def run_cell(cfg: BenchConfig, cell: Cell) -> dict[str, Any]:
    """Train (unless a reference) and evaluate one cell; write ``cell.json`` last. Resumable."""
    import torch

    torch.set_num_threads(cfg.threads)
    folder = cell_dir(cfg, cell)
    keep = _keep(cfg)
    if keep is not None:
        keep.check_base()  # kept verdicts of another base must not pair with this one's
    # one process per cell folder: a second `spf bench cell` of the same cell fails at once
    with output_lock(folder, what=f"bench cell {cell.id}"):
        return _run_cell(cfg, cell, folder)


def _finished_record(cfg: BenchConfig, cell: Cell, done: Path) -> dict[str, Any] | None:
    """The current ``cell.json`` of the work folder, else of the kept copy (restored as it is); None: run it."""
    keep = _keep(cfg)
    here = json.loads(done.read_text()) if done.is_file() else None
    for record in (here, None if keep is None else keep.load_json(done)):
        if record is not None and record_is_current(cfg, cell, record):
            if record is not here:
                save_json(record, done)
            return record
    if here is not None:
        logger.info("%s: cell.json is of other seeds or steps: completing it", cell.id)
    return None


def _run_cell(cfg: BenchConfig, cell: Cell, folder: Path) -> dict[str, Any]:
    done = folder / "cell.json"
    finished = _finished_record(cfg, cell, done)
    if finished is not None:
        return finished
    record: dict[str, Any] = {
        "id": cell.id,
        "group": cell.group,
        "method": cell.method,
        "scenario": cell.scenario,
        "eval": eval_record(cfg),
    }
    t0 = time.perf_counter()
    if cell.kind == "train":
        _run_training_cell(cfg, cell, record)
    else:
        _run_reference_cell(cfg, cell, record)
    record["total_seconds"] = time.perf_counter() - t0
    record["peak_rss_mb"] = _peak_rss_mb()
    save_json(record, done)
    keep = _keep(cfg)
    if keep is not None and cfg.file_seeds is None:
        # not an interim record (some seeds): it would replace one of every seed; its evaluations are kept
        keep.save_json(record, done)
    return record


def _run_child(cfg: BenchConfig, cell: Cell, log_dir: Path) -> tuple[str, int]:
    # each cell in its own process: its peak memory is its own, and a crash fails that cell only
    log_dir.mkdir(parents=True, exist_ok=True)
    seeds = [] if cfg.file_seeds is None else ["--seeds", *map(str, seed_list(cfg))]
    log = log_dir / f"{cell.dirname}.log"
    cmd = [sys.executable, "-m", "spf", "bench", "cell", cfg.source, cell.id, *seeds]
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
        for cell_id, rc in pool.map(lambda c: _run_child(cfg, c, cfg.work_dir / "logs"), pending):
            codes[cell_id] = rc
            print(f"{cell_id}: {'done' if rc == 0 else f'FAILED (exit {rc}), see logs'}", flush=True)
    return codes
