"""The pipeline's stages as plain functions: prepare → align → estimate → analyze → finetune → evaluate.

Each stage reads :class:`~spf.pipeline.params.PipelineParams` and fixed paths under ``runtime.workdir`` (the DVC
``outs``) and returns a small JSON-able dict (paths and numbers, never models) — so the same function backs
``spf <stage> --params params.yaml`` (what ``dvc.yaml`` runs) and the Prefect tasks in ``tasks/``. Every
output folder is built beside its final path and renamed into place once complete (:func:`spf.io.atomic_dir`), so a
crashed stage never leaves an output that DVC or the next stage would take for a finished one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spf.data.locate import shipped_file
from spf.eval.report import flat_metrics
from spf.io import atomic_dir, check_output, output_lock, path_sha256
from spf.pipeline import inputs
from spf.pipeline.params import AlignParams, PipelineParams

logger = logging.getLogger(__name__)

__all__ = [
    "STAGES",
    "STAGE_TABLE",
    "Stage",
    "align_stage",
    "estimate_stage",
    "evaluate_stage",
    "finetune_stage",
    "flat_metrics",
    "path_sha256",
    "prepare_stage",
    "run_stage",
]


# ---------------------------------------------------------------------------------------------- helpers


def _set_threads(p: PipelineParams) -> None:
    if p.runtime.threads:
        import torch

        torch.set_num_threads(p.runtime.threads)


def _write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def aligned_model_ref(p: PipelineParams) -> str:
    """The model the later stages start from: the aligned folder, or ``align.model`` when align is off."""
    ref_file = p.stage_dir("aligned") / "model_ref.json"
    if ref_file.is_file():
        ref = json.loads(ref_file.read_text())["ref"]
        return str(p.stage_dir("aligned")) if ref == "." else ref
    raise FileNotFoundError(f"{ref_file} missing: run the align stage first")


# ---------------------------------------------------------------------------------------------- stages


def prepare_stage(p: PipelineParams) -> dict[str, Any]:
    """Fine-tuning set, safety-sample candidates and held-out harmful prompts → ``workdir/data``, with
    ``manifest.json`` recording every input the run uses (role, source, file, rows, sha256).

    Each input comes from the public data folder when there is one, else from the shipped default
    (:mod:`spf.pipeline.inputs`), so the default ``params.yaml`` runs on a fresh clone."""
    from spf.data.locate import find_shared_data
    from spf.data.samples import ChatSample, load_samples, save_samples
    from spf.data.scenarios import repeat_epochs

    prep = p.prepare
    shared = find_shared_data(prep.shared_data)
    train, train_file = inputs.training_set(
        prep.scenario, shared, n=prep.n, p=prep.p, seed=prep.seed, base=prep.base
    )
    if prep.epochs > 1:
        train = repeat_epochs(train, prep.epochs, seed=prep.seed)
    safety_src = Path(prep.safety_samples) if prep.safety_samples else shipped_file("refusals.jsonl")
    safety = load_samples(safety_src, require_response=True)
    heldout, heldout_file, removed = inputs.heldout_harmful(
        shared, n=prep.heldout_harmful_n, seed=prep.seed, seen=inputs.seen_prompts(p, train, safety)
    )
    out = p.stage_dir("data")
    with atomic_dir(out) as tmp:
        save_samples(train, tmp / "train.jsonl")
        save_samples([ChatSample.from_pair(s.prompt, s.response or "") for s in safety], tmp / "safety.jsonl")
        inputs.write_heldout_csv(heldout, tmp / "heldout_harmful.csv")
        manifest = inputs.manifest(
            p,
            shared,
            tmp,
            train_file,
            safety_src,
            heldout_file,
            removed,
            n_train=len(train),
            n_safety=len(safety),
            n_heldout=len(heldout),
        )
        _write_json(manifest, tmp / "manifest.json")
    logger.info(
        "prepared %d training samples (%s), %d held-out harmful prompts (%s)",
        len(train),
        manifest["train_source"],
        len(heldout),
        manifest["heldout_source"],
    )
    flat = {k: v for k, v in manifest.items() if isinstance(v, str | int | float)}
    return {"data_dir": str(out), **flat, **{f"heldout_removed_{k}": v for k, v in removed.items()}}


def _same_align(params_file: Path, a: AlignParams) -> bool:
    """Was the folder built from this `align` section? A key added to AlignParams after the folder was
    built counts as its default — a new option's default keeps the old behaviour, so a 20-min rebuild
    for it would buy nothing."""
    from dataclasses import asdict

    try:
        stored = json.loads(params_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stored, dict) and {**asdict(AlignParams()), **stored} == asdict(a)


def align_stage(p: PipelineParams) -> dict[str, Any]:
    """The safety-aligned base → ``workdir/aligned`` (a full safetensors model, or a reference to one)."""
    out = p.stage_dir("aligned")
    if not p.align.enabled:
        with atomic_dir(out) as tmp:
            _write_json({"ref": p.align.model, "aligned": False}, tmp / "model_ref.json")
        return {"model_ref": p.align.model, "aligned": False}

    from dataclasses import asdict

    from spf.align import AlignConfig, align

    a = p.align
    # The aligned base costs many minutes: a complete folder built from the same `align` section is kept
    # (e.g. after a crash later in the pipeline, or when an orchestrator's cache record was lost).
    params_file = out / "align_params.json"
    if (out / "model.safetensors").is_file() and params_file.is_file() and _same_align(params_file, a):
        logger.info("aligned base %s is up to date with the align parameters: kept", out)
        return _align_summary(out)
    tmp_out = out.with_name(f".{out.name}.align-{os.getpid()}")
    cfg = AlignConfig(
        model=a.model,
        out=str(tmp_out),
        refusals=a.refusals,
        benign=a.benign,
        n_refusals=a.n_refusals,
        n_benign=a.n_benign,
        steps=a.steps,
        lr=a.lr,
        batch_size=a.batch_size,
        lora_r=a.lora_r,
        seed=a.seed,
        max_new_tokens=a.max_new_tokens,
        eval_max_new_tokens=a.eval_max_new_tokens,
        unlikelihood_weight=a.unlikelihood_weight,
        recovery_per_prompt=a.recovery_per_prompt,
        recovery_max_prefix_tokens=a.recovery_max_prefix_tokens,
        continuation_per_prompt=a.continuation_per_prompt,
        gen_batch_size=a.gen_batch_size,
        threads=p.runtime.threads,
        device=p.runtime.device,
        overwrite=True,
    )
    try:
        align(cfg)  # builds atomically itself; we add the reference file and move it into place
        _write_json({"ref": ".", "aligned": True, "base": a.model}, tmp_out / "model_ref.json")
        _write_json(asdict(a), tmp_out / "align_params.json")
        with atomic_dir(out) as tmp:
            os.rmdir(tmp)
            os.replace(tmp_out, tmp)
    finally:
        shutil.rmtree(tmp_out, ignore_errors=True)
    return _align_summary(out)


def _align_summary(out: Path) -> dict[str, Any]:
    report = json.loads((out / "align_report.json").read_text())
    beh = report.get("heldout_behaviour") or {}
    return {
        "model_ref": str(out),
        "aligned": True,
        **{
            f"heldout_{k}_refusal": v["refusal_rate"]
            for k, v in beh.items()
            if isinstance(v, dict) and "refusal_rate" in v
        },
    }


def estimate_stage(p: PipelineParams) -> dict[str, Any]:
    """The safety subspace from ONE (harmful prompt, refusal) sample → ``workdir/subspace``."""
    from spf.data.samples import load_samples
    from spf.estimate import estimate_to_folder
    from spf.models import load_model

    _set_threads(p)
    est = p.estimate
    model_ref = aligned_model_ref(p)
    candidates = load_samples(p.stage_dir("data") / "safety.jsonl", require_response=True)
    model, tok = load_model(model_ref, device=p.runtime.device)
    out = p.stage_dir("subspace")
    sub, used, seconds = estimate_to_folder(
        model,
        tok,
        candidates,
        out=out,
        rank=est.rank,
        n=est.n_samples,
        own_response=est.own_response,
        loss=est.loss,
        max_length=est.max_length,
        max_new_tokens=est.max_new_tokens,
        model_ref=model_ref,
    )
    return {
        "subspace_dir": str(out),
        "n_samples": len(used) // (2 if est.loss == "margin" else 1),  # a margin pair is 2 rows of 1 sample
        "rank": est.rank,
        "loss": est.loss,
        "n_modules": len(sub.modules),
        "safety_loss": float(sub.metadata.get("safety_loss", float("nan"))),
        "estimate_seconds": round(seconds, 3),
        "sample_prompt": used[0].prompt,
        **{f"cer_at_{k}": sub.mean_cer(k) for k in (1, 5, 10)},
    }


def analyze_stage(p: PipelineParams) -> dict[str, Any]:
    """Insights I–III (``spf analyze``) on the aligned base → ``workdir/analysis`` (analysis.json, PNGs,
    summary.md), measured against the user's own fine-tuning data: is one safety gradient low-rank next to
    a task gradient of the same length (I), does the task pull against it (II), and does one sample's
    subspace capture a batch's (III)? ``analyze.enabled: false`` publishes only a marker, so the DVC out
    and the cache stay well-defined."""
    a = p.analyze
    out = p.stage_dir("analysis")
    if not a.enabled:
        with atomic_dir(out) as tmp:
            _write_json({"enabled": False}, tmp / "analysis.json")
        return {"enabled": 0}

    from spf.analysis.measure import load_utility, run_analysis, select_modules, write_analysis
    from spf.data.samples import load_samples
    from spf.models import load_model

    _set_threads(p)
    # sample 0 is the estimate's own sample (the one SPF projects against; for a margin estimate its
    # refusal row), then the other candidates with their written refusals
    chosen = load_samples(p.stage_dir("subspace") / "sample.jsonl", require_response=True)[:1]
    others = [
        s
        for s in load_samples(p.stage_dir("data") / "safety.jsonl", require_response=True)
        if s.prompt != chosen[0].prompt
    ]
    safety = (chosen + others)[: a.n_safety]
    batch_sizes = [b for b in a.batch_sizes if b <= len(safety)]
    if not batch_sizes:
        raise ValueError(f"analyze.batch_sizes: no size ≤ the {len(safety)} safety samples available")
    train_file = p.stage_dir("data") / "train.jsonl"
    utility = load_utility(
        a.utility_tasks,
        files={"finetune": train_file},
        shared_data=p.prepare.shared_data,
        n=max(4 * a.n_utility, 200),  # the pool the token matching draws same-length samples from
        seed=a.seed,
    )
    model_ref = aligned_model_ref(p)
    model, tok = load_model(model_ref, device=p.runtime.device)
    modules = select_modules(model, None, layer_stride=a.layer_stride)
    analysis = run_analysis(
        model,
        tok,
        safety,
        utility,
        n_utility=a.n_utility,
        batch_sizes=batch_sizes,
        max_k=a.max_k,
        rank=a.rank,
        n_singles=min(a.n_singles, len(safety)),
        modules=modules,
        max_length=a.max_length,
        progress=False,
        meta={
            "model": model_ref,
            "safety": "subspace/sample.jsonl (sample 0) + data/safety.jsonl",
            "safety_sample0": chosen[0].prompt,
            "utility_files": {"finetune": "data/train.jsonl"},
            "layer_stride": a.layer_stride,
            "seed": a.seed,
        },
    )
    write_analysis(analysis, out)
    return {"analysis_dir": str(out), **analysis_metrics(analysis)}


def analysis_metrics(analysis: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of an analysis, flat (MLflow metrics ``analyze/…``)."""
    cer, cos, ov = analysis["cer"], analysis["cosine"], analysis["overlap"]
    metrics: dict[str, float] = {}
    for who in ["safety", *cos["tasks"]]:
        at10 = cer["single"].get(who, {}).get("at", {}).get("10")
        if at10 is not None:
            metrics[f"cer10_single_{who}"] = float(at10)
    for task, block in cos["tasks"].items():
        metrics[f"cos_frac_negative_{task}"] = float(block["overall"]["frac_negative"])
    for n in ov["batch_sizes"]:
        metrics[f"phi_sample0_vs_batch{n}"] = float(ov["vs_batch"][str(n)]["sample0"]["mean"])
    return metrics


def finetune_stage(p: PipelineParams) -> dict[str, Any]:
    """Vanilla, SPF or baseline fine-tuning of the aligned base → ``workdir/finetune`` (adapter, metrics)."""
    from spf.data.samples import load_samples
    from spf.training.loop import train

    out = p.stage_dir("finetune")
    # Training runs in a stable folder beside the output, so that checkpoints survive a killed run and the
    # same command resumes from them; only a finished run is moved to `out` (without its checkpoints).
    partial = out.with_name(f"{out.name}.partial")
    # The baselines' safety pairs default to the shipped alignment refusals — disjoint from the held-out
    # pairs and prompts (data/safety.jsonl, heldout_harmful.csv) the safety loss and the evaluation use.
    cfg = p.finetune.train_config(
        model=aligned_model_ref(p),
        data=str(p.stage_dir("data") / "train.jsonl"),
        out=str(partial),
        heldout_safety=str(p.stage_dir("data") / "safety.jsonl"),
        subspace=str(p.stage_dir("subspace")),
        rank=p.estimate.rank,
        safety_data=str(shipped_file("align_refusals.jsonl")),
        threads=p.runtime.threads,
        device=p.runtime.device,
    )
    # Bad data fails here, before `partial` exists (train() checks it again, cheaply).
    load_samples(cfg.data, require_response=True)
    load_samples(cfg.heldout_safety, require_response=True)
    # `partial` has its own lock (train() takes it again): a `spf train` into it cannot race the key check
    with output_lock(partial, what="runtime.workdir: the finetune training folder"):
        metrics = _train_in(partial, cfg, p, train)
        _publish_run(partial, out)
        shutil.rmtree(partial, ignore_errors=True)
    summary = metrics["summary"]
    # One row per step (training loss, projection diagnostics, and the safety/task loss where evaluated):
    # the file `dvc plots` and the MLflow telemetry read.
    by_step: dict[int, dict[str, Any]] = {}
    for rec in metrics.get("steps", []) + metrics.get("evals", []):
        by_step.setdefault(int(rec["step"]), {}).update(rec)
    rows = [by_step[k] for k in sorted(by_step)]
    from spf.io import atomic_path

    # DVC's `cache: false` plots/metrics are committed to git on purpose: rewriting them is the point
    with atomic_path(Path(p.runtime.workdir) / "telemetry.json", tracked_ok=True) as tmp:
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
    resumes = metrics.get("resumes") or []
    return {
        "adapter_dir": str(out),
        **{k: v for k, v in summary.items() if isinstance(v, int | float | str) and not isinstance(v, bool)},
        "resumed_from_step": resumes[-1]["step"] if resumes else 0,
    }


def _train_in(partial: Path, cfg: Any, p: PipelineParams, train: Callable[..., Any]) -> dict[str, Any]:
    """Train (or resume, or take the finished run) in ``partial``; its metrics."""
    # The run `partial` belongs to: the settings that change the result and the bytes of every input.
    # A folder left by a run with another key is discarded (its checkpoints continue a different run).
    key = _finetune_key(cfg, p)
    key_file = partial / "stage_key.json"
    if partial.exists():
        old = json.loads(key_file.read_text()) if key_file.is_file() else None
        if old != key:
            logger.warning("%s was left by a run with other parameters or inputs: discarded", partial)
            shutil.rmtree(partial)
        elif (partial / "abort.json").is_file():
            logger.info("%s: the last attempt aborted; resuming from its last checkpoint", partial)
    if not partial.exists():
        partial.mkdir(parents=True)
        _write_json(key, key_file)
    # Training resumes from the checkpoints in `partial`; the adapter and metrics.json are written last,
    # so their presence marks a finished run (a kill after training but before the move below finds it).
    weights = ("adapter_config.json", "config.json")  # a LoRA adapter, or a full fine-tune's whole model
    if (partial / "metrics.json").is_file() and any((partial / w).is_file() for w in weights):
        logger.info("%s holds a finished run of the same parameters: publishing it", partial)
        return json.loads((partial / "metrics.json").read_text())
    return train(cfg).metrics  # TrainingAborted leaves `partial` (with abort.json) and `out` untouched


def _publish_run(partial: Path, out: Path) -> None:
    """Move a finished run from ``partial`` to ``out`` (without its checkpoints and stage files)."""
    with atomic_dir(out) as tmp:
        for item in partial.iterdir():
            if item.name in ("checkpoints", "stage_key.json", "abort.json"):
                continue
            os.replace(item, tmp / item.name)
        train_config = tmp / "train_config.json"
        if train_config.is_file():  # name the folder the run ended up in, not the one it was built in
            saved = json.loads(train_config.read_text())
            saved["out"] = str(out)
            _write_json(saved, train_config)


def _finetune_key(cfg: Any, p: PipelineParams) -> dict[str, Any]:
    """What a finetune run's result depends on: its TrainConfig (minus paths and runtime knobs) and the
    content of its inputs (training data, held-out pairs, subspace folder, the aligned model's reference
    files, a baseline's safety data)."""
    from spf.training.checkpoint import resume_config

    hashes: dict[str, str] = {
        "data": path_sha256(cfg.data),
        "heldout_safety": path_sha256(cfg.heldout_safety),
        "subspace": path_sha256(cfg.spf.subspace),
    }
    aligned = p.stage_dir("aligned")
    for name in ("model_ref.json", "align_params.json"):  # the aligned weights are a function of these
        if (aligned / name).is_file():
            hashes[f"aligned/{name}"] = path_sha256(aligned / name)
    if cfg.baselines.safety_data:
        hashes["safety_data"] = path_sha256(cfg.baselines.safety_data)
    config = resume_config(cfg)
    for k in ("model", "data", "heldout_safety"):
        config.pop(k, None)
    config["spf"] = {k: v for k, v in config["spf"].items() if k != "subspace"}
    config["baselines"] = {k: v for k, v in config["baselines"].items() if k != "safety_data"}
    return {"config": config, "inputs": hashes}


@contextmanager
def _base_weights(model: Any, base_ref: str, device: str | None) -> Iterator[Any]:
    """The aligned base: the LoRA model with its adapter switched off, or (a full fine-tune) the base loaded."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
        return
    from spf.models import load_model

    base, _ = load_model(base_ref, device=device)
    try:
        yield base
    finally:
        del base


def evaluate_stage(p: PipelineParams) -> dict[str, Any]:
    """Safety and utility suites on the aligned base + fine-tune output → ``workdir/eval`` (results, samples,
    metrics)."""
    from spf.eval.suites import evaluate
    from spf.io import atomic_path
    from spf.models import load_finetuned

    _set_threads(p)
    ev = p.evaluate
    # LoRA adapter on the aligned base, or a full fine-tune's own weights: the loader the pyfunc model and
    # the benchmark use too, so the evaluated model is the served one
    model, tok = load_finetuned(aligned_model_ref(p), p.stage_dir("finetune"), device=p.runtime.device)
    common = {
        "judge": ev.judge,
        "judge_kwargs": {"min_words": ev.judge_min_words} if ev.judge == "keyword" else None,
        "max_new_tokens": ev.max_new_tokens,
        "batch_size": ev.batch_size,
        "seed": ev.seed,
        "shared_data": p.prepare.shared_data,
    }
    safety = [s for s in ev.suites if s != "utility"]
    results: dict[str, Any] = {"suites": {}, "timing_s": {}, "config": {}}
    records: list[dict[str, Any]] = []
    if safety:
        res, recs = evaluate(
            model,
            tok,
            safety,
            prompts=p.stage_dir("data") / "heldout_harmful.csv",
            limit=ev.limit,
            **common,
        )
        results = res
        records += recs
    if "utility" in ev.suites:
        res, recs = evaluate(
            model, tok, ["utility"], limit=ev.utility_limit, utility_tasks=ev.utility_tasks, **common
        )
        results["suites"].update(res["suites"])
        results["timing_s"].update(res["timing_s"])
        results.setdefault("skipped", {}).update(res.get("skipped", {}))
        records += recs
        # the same utility suite on the aligned base it started from: the gate's `min_utility_gain` asks
        # whether fine-tuning bought anything, which an absolute floor cannot
        with _base_weights(model, aligned_model_ref(p), p.runtime.device) as base:
            res, _ = evaluate(
                base, tok, ["utility"], limit=ev.utility_limit, utility_tasks=ev.utility_tasks, **common
            )
        if "utility" in res["suites"]:
            results["base"] = {"utility": res["suites"]["utility"]}
    metrics = flat_metrics(results)
    results["data"] = _data_record(p, results)
    out = p.stage_dir("eval")
    with atomic_dir(out) as tmp:
        with (tmp / "samples.jsonl").open("w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        _write_json(results, tmp / "results.json")
        _write_json(metrics, tmp / "metrics.json")
    # DVC reads metrics from a file outside the (cached) eval folder, so `dvc metrics diff` needs no checkout
    with atomic_path(Path(p.runtime.workdir) / "metrics.json", tracked_ok=True) as tmp_metrics:
        tmp_metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    return {"eval_dir": str(out), **metrics}


def _data_record(p: PipelineParams, results: dict[str, Any]) -> dict[str, Any]:
    """What the evaluation was measured on: the prepare stage's manifest entries and, per suite, the file
    the suite actually read (a suite falls back to the shipped set when the public one is absent)."""
    sources = {name: s.get("source") for name, s in results.get("suites", {}).items() if isinstance(s, dict)}
    return {"inputs": inputs.manifest_inputs(p.stage_dir("data")), "suite_sources": sources}


@dataclass(frozen=True)
class Stage:
    """One row of the stage graph: what ``dvc.yaml``, the Prefect cache key and the MLflow run all read."""

    name: str
    params: tuple[str, ...]  # params.yaml sections the stage reads (its DVC `params`, its cache key)
    inputs: tuple[str, ...]  # output folders of earlier stages it reads, under runtime.workdir
    output: str  # its own output folder under runtime.workdir (the DVC out)
    func: Callable[[PipelineParams], dict[str, Any]]
    # single keys of other sections the stage also reads: in the Prefect cache key, not in dvc.yaml (a DVC
    # param must exist in every params.yaml, and these may be left out to take their defaults)
    also_reads: tuple[str, ...] = ()


# In run order. finetune reads estimate.rank (it projects with the estimate's k).
STAGE_TABLE: dict[str, Stage] = {
    s.name: s
    for s in (
        # prepare also reads the alignment refusals and the baselines' safety pairs: the held-out prompts are
        # filtered against them, so a change to either must re-run it
        Stage(
            "prepare",
            ("prepare",),
            (),
            "data",
            prepare_stage,
            also_reads=("align.refusals", "finetune.baselines.safety_data"),
        ),
        Stage("align", ("align",), (), "aligned", align_stage),
        Stage("estimate", ("estimate",), ("aligned", "data"), "subspace", estimate_stage),
        Stage("analyze", ("analyze",), ("aligned", "data", "subspace"), "analysis", analyze_stage),
        Stage(
            "finetune", ("finetune", "estimate"), ("aligned", "data", "subspace"), "finetune", finetune_stage
        ),
        Stage("evaluate", ("evaluate",), ("aligned", "data", "finetune"), "eval", evaluate_stage),
    )
}
STAGES = tuple(STAGE_TABLE)


def run_stage(name: str, p: PipelineParams) -> dict[str, Any]:
    if name not in STAGE_TABLE:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    p.check_workspace()  # outputs never land outside the workspace (a symlinked workdir, …)
    # nor in the package or over tracked files: publishing replaces the stage's folder whole
    # (the workdir itself may hold tracked files: DVC's .gitignore and `cache: false` metrics live there)
    check_output(p.runtime.workdir, what="runtime.workdir", tracked=False)
    dest = p.stage_dir(STAGE_TABLE[name].output)
    check_output(dest, what="runtime.workdir", kind=None)
    t0 = time.perf_counter()
    logger.info("stage %s ...", name)
    # one writer per stage output: a second run of the stage fails at once instead of deleting the first
    # one's live folders (finetune.partial) and both reporting success
    with output_lock(dest, what=f"runtime.workdir: the {name} stage output"):
        out = STAGE_TABLE[name].func(p)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    logger.info("stage %s done in %.1f s", name, out["seconds"])
    return out
