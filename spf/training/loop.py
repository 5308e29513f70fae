"""One training loop for vanilla and SPF fine-tuning, over LoRA (peft) or full fine-tuning, plus the baseline
defenses of :mod:`spf.training.baselines` (SafeInstr, SafeGrad-style gradient surgery, Lisa) for comparison.

It reads top to bottom as ``_setup`` → ``_fit`` → ``_finish``. What differs per method is a method object
(:mod:`spf.training.methods`) with named hooks; evaluation, fault aborts and checkpoints are callbacks
(:mod:`spf.training.callbacks`). Metrics go to an injected ``callback(record: dict)`` — no tracking library is
imported here; the MLflow bridge lives with the pipeline. Everything the loop writes is safetensors or JSON.

Faults abort the run with :class:`TrainingAborted` and an ``abort.json`` in the output folder (reason,
step, values) instead of a finished adapter: a non-finite loss or gradient norm at any step, a non-finite
safety/task loss at an eval point, and — when ``abort_safety_rise`` is set — a tracked refusal loss that
rose above its step-0 value by more than that bound. A resumed run checks that its checkpoint was written
with the same configuration.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from spf.core.distributed import (
    DistContext,
    all_reduce_gradients,
    barrier,
    broadcast_parameters,
    init_from_env,
    is_distributed,
    mean_over_ranks,
)
from spf.core.losses import encode_prefix_batch, prefix_unlikelihood_loss
from spf.data.samples import ChatSample, encode_sample, load_samples, pad_token_id
from spf.io import OutputError, check_output, output_lock, save_json
from spf.models import auto_device, default_target_modules, load_model, unwrap
from spf.training.callbacks import (
    ABORT_FILE,
    Aborter,
    Checkpointer,
    Emitter,
    SafetyMonitor,
    Snapshotter,
    TrainingAborted,
)
from spf.training.checkpoint import (
    SNAPSHOTS,
    check_finished_run,
    check_resume_config,
    discard_partial_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_finetuned,
)
from spf.training.config import TrainConfig
from spf.training.methods import DataStream, Method, load_safety_samples, make_method

logger = logging.getLogger(__name__)

__all__ = ["ABORT_FILE", "TrainResult", "TrainingAborted", "load_safety_samples", "train"]

Callback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    out: Path
    metrics: dict[str, Any]


@dataclass
class _Run:
    """Everything one run holds between ``_setup``, ``_fit`` and ``_finish``."""

    cfg: TrainConfig
    ctx: DistContext
    device: torch.device
    out: Path
    model: Any
    tokenizer: Any
    pad: int  # the tokenizer's padding id, for collate
    method: Method
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ul_prompts: list[ChatSample]
    emit: Emitter
    abort: Aborter
    monitor: SafetyMonitor
    callbacks: list[Any]
    t_start: float
    streams: dict[str, DataStream] = field(default_factory=dict)  # phase → data, set once resumed
    start_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # counts for the summary
    frozen: list[str] = field(default_factory=list)  # parameter names full fine-tuning leaves frozen


def train(cfg: TrainConfig, callback: Callback | None = None) -> TrainResult:
    """Fine-tune ``cfg.model`` on ``cfg.data``; write the adapter/weights, ``metrics.json`` and checkpoints.

    Raises :class:`TrainingAborted` (after writing ``abort.json``) on a fault; see the module docstring.
    """
    with ExitStack() as hold:  # the lock on `out`, held for the whole run (released on any exit)
        run = _setup(cfg, callback, hold)
        _fit(run)
        return _finish(run)


# ------------------------------------------------------------------------------------------------- setup


def _device_and_context(cfg: TrainConfig) -> tuple[torch.device, DistContext]:
    device = torch.device(cfg.device) if cfg.device else auto_device()
    # Data parallelism (torchrun / accelerate launch): every rank runs this loop on its slice of each global
    # batch; gradients are averaged before anything uses them, so clipping, the baselines and the SPF
    # projection see the same gradient everywhere, and rank 0's subspace is broadcast (SPFOptimizer). Only
    # rank 0 writes.
    ctx = init_from_env(device.type)
    if ctx.world > 1 and device.type == "cuda" and cfg.device in (None, "cuda"):
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    return device, ctx


def _setup_model(cfg: TrainConfig, device: torch.device) -> tuple[Any, Any, list[str]]:
    """The model (LoRA-wrapped or with its weights trainable), its tokenizer, and the frozen parameters'
    names of full fine-tuning."""
    model, tokenizer = load_model(cfg.model, device=device)
    frozen: list[str] = []
    if cfg.finetune == "lora":
        targets = cfg.lora.target_modules or default_target_modules(model)
        lcfg = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    else:
        frozen = _select_full_params(model, cfg.full_params)
    model.train()
    return model, tokenizer, frozen


def _select_full_params(model, full_params: str) -> list[str]:
    """Full fine-tuning: make trainable what ``full_params`` names; return the names left frozen.

    ``"projected"``: only the weights of the decoder blocks' linear layers (``default_target_modules``) —
    exactly what SPF projects, so no method trains something SPF would leave unprotected. ``"all"``: all.
    """
    base = unwrap(model)
    covered = set()
    for name in default_target_modules(base):
        weight = getattr(base.get_submodule(name), "weight", None)
        if isinstance(weight, torch.Tensor):
            covered.add(id(weight))
    frozen = []
    for name, p in base.named_parameters():
        trainable = full_params == "all" or id(p) in covered
        p.requires_grad_(trainable)
        if not trainable:
            frozen.append(name)
    if frozen:
        logger.info(
            "full fine-tuning: %d parameter tensors frozen (not covered by the projection; full_params='all' "
            "trains them), e.g. %s",
            len(frozen),
            ", ".join(frozen[:5]),
        )
    return frozen


def _heldout_pool(
    cfg: TrainConfig, tracked: list[ChatSample], safety: list[ChatSample]
) -> tuple[list[ChatSample], int]:
    """The held-out safety pairs, never any the subspace was built from nor any a baseline trains on; and how
    many were left out for being in the baseline's safety data."""
    if not cfg.heldout_safety:
        return [], 0
    skip = {s.sha256() for s in tracked}
    pool = [s for s in load_samples(cfg.heldout_safety, require_response=True) if s.sha256() not in skip]
    overlap = 0
    if safety:
        trained = {s.sha256() for s in safety}
        kept = [s for s in pool if s.sha256() not in trained]
        overlap = len(pool) - len(kept)
        if overlap:
            logger.warning(
                "%d held-out safety pairs are also in baselines.safety_data: left out of the held-out loss",
                overlap,
            )
        pool = kept
    return pool[: cfg.heldout_n], overlap


def _inputs(cfg: TrainConfig) -> dict[str, Any]:
    """Every path the run reads, by flag: `out` may be none of them, nor hold or lie inside one."""
    return {
        "--model": cfg.model,
        "--data": cfg.data,
        "--subspace": cfg.spf.subspace,
        "--safety-sample": cfg.spf.sample,
        "--safety-data": cfg.baselines.safety_data,
        "--heldout-safety": cfg.heldout_safety,
        "--unlikelihood-data": cfg.unlikelihood.data,
    }


def _claim_out(cfg: TrainConfig, ctx: DistContext, hold: ExitStack) -> None:
    """Rank 0 takes the one-writer lock on ``out`` (a second run into it fails at once, naming this one)
    and checks that a finished run there is of the same configuration. Every rank learns the outcome:
    a refused rank 0 must not leave the others waiting at a barrier."""
    error = None
    if ctx.is_main:
        try:
            hold.enter_context(output_lock(cfg.out))
            check_finished_run(Path(cfg.out), cfg)
        except OutputError as exc:
            error = str(exc)
        except OSError as exc:  # e.g. no permission to create the lock file beside `out`
            error = f"--out {cfg.out}: cannot take its lock ({exc.strerror or exc})"
    if is_distributed():
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise OutputError(error)


def _prepare_out(out: Path, cfg: TrainConfig, ctx: DistContext) -> None:
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in discard_partial_checkpoints(out):
            logger.info("removed %s (a checkpoint save that was interrupted)", tmp)
        if not cfg.resume:
            _start_over(out)
        (out / ABORT_FILE).unlink(missing_ok=True)  # a previous attempt's; rewritten if this one aborts too
    barrier()  # the other ranks look for checkpoints only once rank 0 has cleaned up


def _start_over(out: Path) -> None:
    """Resume off: remove what an older run left in ``out``."""
    for name in ("checkpoints", SNAPSHOTS):
        if (out / name).is_dir():
            # older checkpoints would mix with this run's and a later resume could pick one of them; an
            # older snapshot would be read as this run's by whoever evaluates the exposure curve
            shutil.rmtree(out / name)
            logger.info("resume off: removed the %s in %s", name, out)
    # the old run's markers: a crash of this one must not look finished
    for name in ("metrics.json", "train_config.json"):
        (out / name).unlink(missing_ok=True)


def _setup(cfg: TrainConfig, callback: Callback | None, hold: ExitStack) -> _Run:
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    method = make_method(cfg)
    # `out` may not be the package, tracked source, an input, or a file; reads only
    check_output(cfg.out, inputs=_inputs(cfg))
    # validate the data before anything is created on disk
    data = load_samples(cfg.data, require_response=True, limit=cfg.limit_data)
    # the (harmful prompt, refusal) pairs a baseline trains on/against
    safety = load_samples(cfg.baselines.safety_data, require_response=True) if method.uses_safety_data else []
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    device, ctx = _device_and_context(cfg)
    _claim_out(cfg, ctx, hold)  # before the model load: a second writer fails at once
    model, tokenizer, frozen = _setup_model(cfg, device)
    encoded = [
        encode_sample(tokenizer, s, max_length=cfg.max_length) for s in method.prepare_data(data, safety)
    ]
    tracked = method.setup(model, tokenizer, device)
    heldout, overlap = _heldout_pool(cfg, tracked, safety)
    ul = cfg.unlikelihood
    ul_prompts = load_samples(ul.data) if ul.data and ul.weight > 0 else []

    params = [p for p in model.parameters() if p.requires_grad]
    broadcast_parameters(params)
    inner = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer = method.wrap_optimizer(inner, model, tokenizer)
    warm = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
    )
    # Everything above only reads (data, model, subspace): a bad input fails before `out` exists.
    _prepare_out(out, cfg, ctx)
    emit, abort = Emitter(callback, ctx.is_main), Aborter(out, cfg, ctx.is_main)
    # task_eval: a fixed slice of the training data, a less noisy task loss than the last batch's
    sample = tracked[0] if tracked else None
    monitor = SafetyMonitor(cfg, model, tokenizer, sample, heldout, data[: cfg.task_eval_n], [], emit, abort)
    run = _Run(
        cfg=cfg, ctx=ctx, device=device, out=out, model=model, tokenizer=tokenizer, pad=pad_token_id(tokenizer),
        method=method, params=params, optimizer=optimizer, scheduler=scheduler, ul_prompts=ul_prompts,
        emit=emit, abort=abort, monitor=monitor,
        # the snapshot of a step before its checkpoint: a crash between the two resumes from an earlier
        # checkpoint and passes the step again, instead of resuming past a snapshot never written
        callbacks=[monitor, Snapshotter(cfg, out, ctx.is_main), Checkpointer(cfg, out, ctx.is_main)],
        t_start=t_start, info={"heldout_overlap_removed": overlap}, frozen=frozen,
    )  # fmt: skip
    ckpt = _resume(run)
    # one global index stream (world × batch_size per micro-batch); each rank trains on its slice, so a
    # run on N ranks sees the data a single process with an N× larger batch would
    gbs = cfg.batch_size * ctx.world
    run.streams = method.streams(encoded, run.start_step, gbs, gbs * cfg.grad_accum)
    if ckpt is not None:
        emit({"kind": "resume", "step": run.start_step, "checkpoint": str(ckpt)})
    return run


def _resume(run: _Run) -> Path | None:
    """Continue from the newest checkpoint in ``out`` (when ``resume``): weights, optimizer, RNG, scheduler,
    history, evaluations and the method's state; return the checkpoint (None: a fresh start)."""
    cfg = run.cfg
    ckpt = latest_checkpoint(run.out) if cfg.resume else None
    saved_sub = None
    if ckpt is not None:
        state, saved_sub = load_checkpoint(ckpt, run.model, run.optimizer)
        check_resume_config(ckpt, state.get("config"), cfg)
        run.start_step, run.history = state["step"], state["history"]
        run.monitor.evals.extend(state["evals"])
        run.resumes = [*state.get("resumes", []), {"step": run.start_step, "checkpoint": ckpt.name}]
        run.scheduler.load_state_dict(state["scheduler"])
        logger.info(
            "resumed from %s at step %d (%.1f s after the start of train())",
            ckpt,
            run.start_step,
            time.perf_counter() - run.t_start,
        )
    run.method.load_state(ckpt, saved_sub, run.start_step, run.model, run.params)
    return ckpt


# --------------------------------------------------------------------------------------------------- fit


def _fit(run: _Run) -> None:
    cfg, start = run.cfg, run.start_step
    if start == 0:
        run.monitor.evaluate(0)
    run.model.train()
    bar = tqdm(
        range(start, cfg.steps),
        desc=f"train[{run.method.name}]",
        initial=start,
        total=cfg.steps,
        disable=not run.ctx.is_main,
    )
    for step in bar:
        rec = _train_step(run, step)
        run.history.append(rec)
        run.emit({"kind": "train", **rec})
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if step == start and start > 0:
            logger.info(
                "step %d done: the first after resuming (%.1f s after the start of train())",
                step + 1,
                time.perf_counter() - run.t_start,
            )
        for cb in run.callbacks:
            cb.on_step_end(run, step + 1)
    bar.close()


def _train_step(run: _Run, step: int) -> dict[str, Any]:
    """One optimizer step (0-based ``step``); its record, as in ``metrics.json``'s ``steps``."""
    t0 = time.perf_counter()
    run.method.begin_step(step, run.params)
    total = _accumulate(run, step, run.method.phase(step))
    ul_value = _unlikelihood(run, step)
    if run.ctx.world > 1:
        all_reduce_gradients(run.params)
        total = mean_over_ranks(total)
        if not math.isfinite(total):
            raise run.abort(TrainingAborted("non-finite loss", step + 1, "non_finite", {"loss": total}))
    method_rec = run.method.after_backward(step, run.params)
    _check_grad_norm(run, step, total)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    rec: dict[str, Any] = {
        "step": step + 1,
        "loss": total,
        "lr": run.scheduler.get_last_lr()[0],
        "step_seconds": time.perf_counter() - t0,
    }
    if ul_value is not None:
        rec["unlikelihood_loss"] = ul_value
    rec.update(run.method.after_step(run.optimizer))
    rec.update(method_rec)
    return rec


def _accumulate(run: _Run, step: int, phase: str) -> float:
    """Forward and backward over the step's micro-batches from the phase's stream; the summed loss."""
    cfg, ctx = run.cfg, run.ctx
    mine = slice(ctx.rank * cfg.batch_size, (ctx.rank + 1) * cfg.batch_size)
    total = 0.0
    for micro in range(cfg.grad_accum):
        rows = run.streams[phase].next()[mine]
        # the method builds the micro-batch (SPF's fused estimate appends its safety rows to the first)
        with run.method.micro_batch(rows, micro, run.pad, run.device) as mb:
            loss = mb.loss(run.model) / cfg.grad_accum
            value = float(loss.detach())
            if not math.isfinite(value) and ctx.world == 1:
                # before backward: a NaN loss would only fill every gradient with NaN (with several ranks
                # the check waits for the all-reduced loss, so that every rank aborts together)
                raise run.abort(TrainingAborted("non-finite loss", step + 1, "non_finite", {"loss": value}))
            mb.backward(loss)
        total += value
    return total


def _unlikelihood(run: _Run, step: int) -> float | None:
    """The unlikelihood (prefix) loss on this step's prompts, backpropagated with its weight; None when off."""
    if not run.ul_prompts:
        return None
    cfg, ul = run.cfg, run.cfg.unlikelihood
    # a deterministic, resumable pick of prompts for this step
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
    pick = torch.randint(len(run.ul_prompts), (ul.batch_size,), generator=gen).tolist()
    ul_batch = encode_prefix_batch(
        run.tokenizer, [run.ul_prompts[i] for i in pick], ul.prefixes, max_length=cfg.max_length
    )
    ul_loss = prefix_unlikelihood_loss(run.model, {k: v.to(run.device) for k, v in ul_batch.items()})
    value = float(ul_loss.detach())
    if not math.isfinite(value):
        raise run.abort(
            TrainingAborted(
                "non-finite loss (unlikelihood)", step + 1, "non_finite", {"unlikelihood_loss": value}
            )
        )
    (ul.weight * ul_loss).backward()
    return value


def _check_grad_norm(run: _Run, step: int, total: float) -> None:
    """Clip (with ``max_grad_norm``) and abort on a non-finite total gradient norm — finite iff every
    gradient entry is."""
    params, bound = run.params, run.cfg.max_grad_norm
    grad_norm = float(
        torch.nn.utils.clip_grad_norm_(params, bound)
        if bound
        else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    )
    if not math.isfinite(grad_norm):
        raise run.abort(
            TrainingAborted(
                "non-finite gradient", step + 1, "non_finite", {"grad_norm": grad_norm, "loss": total}
            )
        )


# ------------------------------------------------------------------------------------------------ finish


def _finish(run: _Run) -> TrainResult:
    cfg, ctx = run.cfg, run.ctx
    run.monitor.evaluate(cfg.steps)
    run.model.eval()
    evals = run.monitor.evals
    if not ctx.is_main:
        barrier()  # rank 0 is writing the output
        return TrainResult(
            out=run.out, metrics={"summary": {}, "steps": run.history, "evals": evals, "rank": ctx.rank}
        )
    with run.method.output_weights(run.params):
        save_finetuned(run.model, run.tokenizer, run.out, cfg.to_dict())  # what every snapshot holds too
    metrics = _summarise(cfg, run.method, run.history, evals, run.info)
    metrics["resumes"] = (
        run.resumes
    )  # where this run continued from a checkpoint ([] = one uninterrupted run)
    metrics["summary"]["world_size"] = ctx.world
    if cfg.finetune == "full":
        metrics["summary"]["frozen_params"] = len(run.frozen)  # parameter tensors full_params left frozen
    save_json(metrics, run.out / "metrics.json")
    barrier()
    return TrainResult(out=run.out, metrics=metrics)


def _summarise(
    cfg: TrainConfig, method: Method, history: list[dict], evals: list[dict], info: dict[str, Any]
) -> dict[str, Any]:
    times = [h["step_seconds"] for h in history[1:]] or [h["step_seconds"] for h in history]
    task_steps = method.task_steps(history)
    summary: dict[str, Any] = {
        "method": method.name,
        "finetune": cfg.finetune,
        "steps": cfg.steps,
        "final_loss": task_steps[-1]["loss"] if task_steps else None,
        "mean_step_seconds": sum(times) / len(times) if times else None,
    }
    for key in ("safety_loss_sample", "safety_loss_heldout", "task_loss"):
        vals = [e[key] for e in evals if key in e]
        if vals:
            summary[f"{key}_start"] = vals[0]
            summary[f"{key}_end"] = vals[-1]
            summary[f"{key}_rise"] = vals[-1] - vals[0]
    summary.update(method.summary(history, info))
    return {"summary": summary, "steps": history, "evals": evals}
