"""One training loop for vanilla and SPF fine-tuning, over LoRA (peft) or full fine-tuning, plus the baseline
defenses of :mod:`spf.train.baselines` (SafeInstr, SafeGrad-style gradient surgery, Lisa) for comparison.

Metrics go to an injected ``callback(record: dict)`` — no tracking library is imported here; the MLflow
bridge lives with the pipeline. Everything the loop writes is safetensors or JSON.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from spf.core.distributed import (
    all_reduce_gradients,
    barrier,
    broadcast_parameters,
    init_from_env,
    mean_over_ranks,
)
from spf.core.losses import batch_loss, encode_prefix_batch, prefix_unlikelihood_loss, response_loss
from spf.core.optimizer import SPFOptimizer
from spf.core.subspace import SafetySubspace, estimate_batch_subspace, estimate_safety_subspace
from spf.data.samples import ChatSample, collate, encode_sample, load_samples, pad_token_id
from spf.io import save_json
from spf.models import auto_device, default_target_modules, load_model, unwrap
from spf.train.baselines import (
    add_proximal_grad,
    lisa_last_switch,
    lisa_state,
    lisa_steps_before,
    mix_safety_demos,
    pcgrad_project,
    safety_batch_indices,
)
from spf.train.checkpoint import (
    discard_partial_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    load_extra_tensors,
    save_checkpoint,
)
from spf.train.config import BASELINE_METHODS, TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["ABORT_FILE", "TrainResult", "TrainingAborted", "load_safety_samples", "train"]

Callback = Callable[[dict[str, Any]], None]

ABORT_FILE = "abort.json"
# TrainConfig fields that change how a run is executed or saved, never what it computes: a checkpoint
# written under other values of these may be resumed.
_RESUME_NEUTRAL = ("out", "resume", "save_every", "keep_checkpoints", "threads", "device")


class TrainingAborted(RuntimeError):
    """A run stopped on a fault. ``kind``: ``non_finite`` or ``safety_drift``; ``step``: the optimizer step
    (1-based, as in ``metrics.json``; 0 = the evaluation before training) at which it was detected."""

    def __init__(self, reason: str, step: int, kind: str, values: dict[str, Any] | None = None) -> None:
        self.reason, self.step, self.kind, self.values = reason, step, kind, dict(values or {})
        self.path: Path | None = None  # abort.json, once written
        super().__init__(f"{reason} at step {step}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "aborted": True,
            "reason": self.reason,
            "kind": self.kind,
            "step": self.step,
            "values": {k: _json_number(v) for k, v in self.values.items()},
        }


def _json_number(value: Any) -> Any:
    """NaN/inf as text ("nan", "inf"): strict JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _resume_config(cfg: TrainConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    for key in _RESUME_NEUTRAL:
        d.pop(key, None)
    return d


def _check_resume_config(ckpt: Path, saved: dict[str, Any] | None, cfg: TrainConfig) -> None:
    """A checkpoint continues only the run that wrote it: any field that changes the result must match."""
    if saved is None:
        logger.warning("%s records no configuration (written by an older version): not checked", ckpt)
        return
    now = _resume_config(cfg)

    def diff(a: Any, b: Any, prefix: str) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                found = diff(a.get(key), b.get(key), f"{prefix}{key}.")
                if found:
                    return found
            return None
        return None if a == b else f"{prefix.rstrip('.')}: checkpoint {a!r}, this run {b!r}"

    found = diff(saved, now, "")
    if found:
        raise ValueError(
            f"{ckpt} was written by a run with another configuration ({found}); "
            "resume with the same settings, use another output folder, or start over (resume=False / --no-resume)"
        )


@dataclass
class TrainResult:
    out: Path
    metrics: dict[str, Any]


def load_safety_samples(subspace_dir: str | Path) -> list[ChatSample]:
    """The (prompt, refusal) sample(s) `spf estimate` stored next to the subspace, for re-estimation.

    One sample for SPF proper; several when the folder holds a batch estimate (an ablation).
    """
    return load_samples(Path(subspace_dir) / "sample.jsonl", require_response=True)


def _batches(n: int, batch_size: int, seed: int, start: int):
    """Deterministic index stream: epoch e is a permutation seeded by (seed, e); resumable from `start`."""
    pos = start
    perm: list[int] = []
    perm_epoch = -1
    while True:
        batch = []
        for _ in range(batch_size):
            epoch, i = divmod(pos, n)
            if epoch != perm_epoch:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                perm = torch.randperm(n, generator=gen).tolist()
                perm_epoch = epoch
            batch.append(perm[i])
            pos += 1
        yield batch, pos


def _setup_model(cfg: TrainConfig, device: torch.device):
    model, tokenizer = load_model(cfg.model, device=device)
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
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model, tokenizer


def _resolve_spf(cfg: TrainConfig, model, tokenizer) -> tuple[SafetySubspace, list[ChatSample]]:
    s = cfg.spf
    if s.subspace:
        sub = SafetySubspace.load(s.subspace)
        if sub.rank > s.rank:
            sub = sub.truncate(s.rank)
        elif sub.rank < s.rank:
            logger.warning(
                "subspace folder has rank %d < spf.rank %d: using %d until the first refresh",
                sub.rank,
                s.rank,
                sub.rank,
            )
        samples = load_safety_samples(s.subspace)
        if sub.metadata.get("model_ref") not in (None, cfg.model):
            logger.warning(
                "subspace was estimated on %s, training %s", sub.metadata.get("model_ref"), cfg.model
            )
        return sub, samples
    from spf.refusal import first_refused, own_refusal  # generation is only needed here

    candidates = load_samples(s.sample)  # type: ignore[arg-type]
    if s.sample_index is not None:
        if not 0 <= s.sample_index < len(candidates):
            raise ValueError(f"{s.sample}: index {s.sample_index} out of range (0..{len(candidates) - 1})")
        cand = candidates[s.sample_index]
        sample = cand if cand.response else own_refusal(model, tokenizer, cand)
    else:
        with_resp = [c for c in candidates if c.response]
        sample = with_resp[0] if with_resp else first_refused(model, tokenizer, candidates)
    sub = estimate_safety_subspace(
        model, tokenizer, sample, rank=s.rank, max_length=cfg.max_length, model_ref=cfg.model
    )
    return sub, [sample]


def train(cfg: TrainConfig, callback: Callback | None = None) -> TrainResult:
    """Fine-tune ``cfg.model`` on ``cfg.data``; write the adapter/weights, ``metrics.json`` and checkpoints.

    Raises :class:`TrainingAborted` (after writing ``abort.json``) on a fault; see the module docstring.
    """
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # validate the data before anything is created on disk
    data = load_samples(cfg.data, require_response=True, limit=cfg.limit_data)
    bl = cfg.baselines
    baseline_safety: list[ChatSample] = []  # the (harmful prompt, refusal) pairs a baseline trains on/against
    if cfg.method in BASELINE_METHODS:
        baseline_safety = load_samples(bl.safety_data, require_response=True)  # type: ignore[arg-type]
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device) if cfg.device else auto_device()
    # Data parallelism (torchrun / accelerate launch): every rank runs this loop on its slice of each global
    # batch; gradients are averaged before anything uses them, so clipping, the baselines and the SPF
    # projection see the same gradient everywhere, and rank 0's subspace is broadcast (SPFOptimizer). Only
    # rank 0 writes.
    ctx = init_from_env(device.type)
    if ctx.world > 1 and device.type == "cuda" and cfg.device in (None, "cuda"):
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)

    model, tokenizer = _setup_model(cfg, device)
    pad = pad_token_id(tokenizer)
    train_samples = data
    safeinstr_added: list[ChatSample] = []
    if cfg.method == "safeinstr":
        train_samples, safeinstr_added = mix_safety_demos(
            data, baseline_safety, bl.safeinstr_fraction, cfg.seed
        )
        logger.info("safeinstr: %d safety demos added to %d task samples", len(safeinstr_added), len(data))
    encoded = [encode_sample(tokenizer, s, max_length=cfg.max_length) for s in train_samples]
    safety_encoded = (
        [encode_sample(tokenizer, s, max_length=cfg.max_length) for s in baseline_safety]
        if cfg.method in ("safegrad", "lisa")
        else []
    )

    subspace: SafetySubspace | None = None
    safety_samples: list[ChatSample] = []
    if cfg.method == "spf":
        subspace, safety_samples = _resolve_spf(cfg, model, tokenizer)
    elif cfg.spf.subspace:  # vanilla still tracks the loss on the same sample, for comparison
        safety_samples = load_safety_samples(cfg.spf.subspace)
    sample = safety_samples[0] if safety_samples else None

    heldout: list[ChatSample] = []
    heldout_overlap = 0
    if cfg.heldout_safety:
        skip = {s.sha256() for s in safety_samples}  # never evaluate on what the subspace was built from
        loaded = load_samples(cfg.heldout_safety, require_response=True)
        pool = [s for s in loaded if s.sha256() not in skip]
        if baseline_safety:  # nor on what a baseline trains on
            trained = {s.sha256() for s in baseline_safety}
            kept = [s for s in pool if s.sha256() not in trained]
            if len(kept) < len(pool):
                logger.warning(
                    "%d held-out safety pairs are also in baselines.safety_data: left out of the held-out loss",
                    len(pool) - len(kept),
                )
            heldout_overlap = len(pool) - len(kept)
            pool = kept
        heldout = pool[: cfg.heldout_n]

    ul = cfg.unlikelihood
    ul_prompts = load_samples(ul.data) if ul.data and ul.weight > 0 else []
    # a fixed slice of the training data: a less noisy task loss than the last batch's
    task_eval = data[: cfg.task_eval_n]

    params = [p for p in model.parameters() if p.requires_grad]
    broadcast_parameters(params)
    inner = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer: torch.optim.Optimizer = inner
    if cfg.method == "spf":
        assert subspace is not None and safety_samples
        modules = subspace.modules
        # a margin subspace (refusal vs compliance pair, weights [1, -1]) is re-estimated the same way
        weights = subspace.metadata.get("weights")

        def refresh() -> SafetySubspace:
            return estimate_batch_subspace(
                model,
                tokenizer,
                safety_samples,
                rank=cfg.spf.rank,
                modules=modules,
                max_length=cfg.max_length,
                weights=weights,
            )

        optimizer = SPFOptimizer(
            inner,
            model,
            subspace,
            mode=cfg.spf.mode,
            project_on=cfg.spf.project_on,
            refresh_every=cfg.spf.refresh_every,
            refresh_fn=refresh,
            conflict_scope=cfg.spf.conflict_scope,
            diagnostics=cfg.spf.diagnostics,
        )
    warm = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
    )

    # Everything above only reads (data, model, subspace): a bad input fails before `out` exists.
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in discard_partial_checkpoints(out):
            logger.info("removed %s (a checkpoint save that was interrupted)", tmp)
        if not cfg.resume and (out / "checkpoints").is_dir():
            # starting over: older checkpoints would otherwise mix with this run's and a later resume could
            # pick one of them
            shutil.rmtree(out / "checkpoints")
            logger.info("resume off: removed the checkpoints in %s", out)
        (out / ABORT_FILE).unlink(missing_ok=True)  # a previous attempt's; rewritten if this one aborts too
    barrier()  # the other ranks look for checkpoints only once rank 0 has cleaned up

    start_step, history, evals = 0, [], []
    resumes: list[dict[str, Any]] = []
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state, saved_sub = load_checkpoint(ckpt, model, optimizer)
        _check_resume_config(ckpt, state.get("config"), cfg)
        start_step, history, evals = state["step"], state["history"], state["evals"]
        resumes = [*state.get("resumes", []), {"step": start_step, "checkpoint": ckpt.name}]
        scheduler.load_state_dict(state["scheduler"])
        if saved_sub is not None and isinstance(optimizer, SPFOptimizer):
            optimizer.set_subspace(saved_sub)
        logger.info(
            "resumed from %s at step %d (%.1f s after the start of train())",
            ckpt,
            start_step,
            time.perf_counter() - t_start,
        )
        emit_resume = {"kind": "resume", "step": start_step, "checkpoint": str(ckpt)}
    else:
        emit_resume = None

    # Lisa: the proximal anchor is the trainable weights at the last switch between states (at step 0: the
    # starting weights); a checkpoint taken between two switches carries it.
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    lisa_anchor: list[torch.Tensor] = []
    if cfg.method == "lisa":
        saved = load_extra_tensors(ckpt, "lisa_anchor") if ckpt is not None else None
        if saved is not None:
            lisa_anchor = [
                saved[n].to(p.device, p.dtype) for n, p in zip(trainable_names, params, strict=True)
            ]
        elif lisa_last_switch(start_step, bl.lisa_align_steps, bl.lisa_task_steps) == start_step:
            lisa_anchor = [p.detach().clone() for p in params]
        else:
            raise ValueError(f"{ckpt}: lisa checkpoint without lisa_anchor.safetensors between two switches")

    def emit(record: dict[str, Any]) -> None:
        if callback is not None and ctx.is_main:
            callback(record)

    if emit_resume is not None:
        emit(emit_resume)

    def abort(exc: TrainingAborted) -> TrainingAborted:
        """Record the fault where the finished output would be, then hand the exception back to raise."""
        if ctx.is_main:
            (out / "metrics.json").unlink(missing_ok=True)  # the completion marker of an older run here
            save_json({**exc.to_dict(), "method": cfg.method, "config": cfg.to_dict()}, out / ABORT_FILE)
        exc.path = out / ABORT_FILE
        logger.error("training aborted: %s at step %d (%s)", exc.reason, exc.step, exc.path)
        return exc

    safety_keys = ("safety_loss_heldout", "safety_loss_sample")

    def check_eval(rec: dict[str, Any]) -> None:
        step = rec["step"]
        bad = {k: v for k, v in rec.items() if k != "step" and not math.isfinite(v)}
        if bad:
            raise abort(TrainingAborted(f"non-finite eval loss ({', '.join(bad)})", step, "non_finite", bad))
        bound = cfg.abort_safety_rise
        if bound is None or not evals or evals[0] is rec:
            return
        for key in safety_keys:
            if key in rec and key in evals[0]:
                start, now = evals[0][key], rec[key]
                if now - start > bound:
                    raise abort(
                        TrainingAborted(
                            f"safety drift: {key} rose by {now - start:.4f} "
                            f"(from {start:.4f} at step {evals[0]['step']} to {now:.4f}), "
                            f"above abort_safety_rise {bound:g}",
                            step,
                            "safety_drift",
                            {
                                key: now,
                                f"{key}_start": start,
                                "rise": now - start,
                                "abort_safety_rise": bound,
                            },
                        )
                    )

    def evaluate(step: int) -> None:
        rec: dict[str, Any] = {"step": step}
        if sample is not None:
            rec["safety_loss_sample"] = response_loss(model, tokenizer, [sample], max_length=cfg.max_length)[
                0
            ]
        if heldout:
            losses = response_loss(model, tokenizer, heldout, max_length=cfg.max_length)
            rec["safety_loss_heldout"] = sum(losses) / len(losses)
        if task_eval:
            losses = response_loss(model, tokenizer, task_eval, max_length=cfg.max_length)
            rec["task_loss"] = sum(losses) / len(losses)
        if len(rec) > 1:
            evals.append(rec)
            emit({"kind": "eval", **rec})
            check_eval(rec)

    if start_step == 0:
        evaluate(0)
    per_step = cfg.batch_size * cfg.grad_accum
    task_steps_done, align_steps_done = start_step, 0
    if cfg.method == "lisa":  # each data stream resumes where its own steps left it
        align_steps_done, task_steps_done = lisa_steps_before(
            start_step, bl.lisa_align_steps, bl.lisa_task_steps
        )
    # one global index stream (world × batch_size per micro-batch); each rank trains on its slice, so a
    # run on N ranks sees the data a single process with an N× larger batch would
    gbs = cfg.batch_size * ctx.world
    mine = slice(ctx.rank * cfg.batch_size, (ctx.rank + 1) * cfg.batch_size)
    stream = _batches(len(encoded), gbs, cfg.seed, start=task_steps_done * per_step * ctx.world)
    align_stream = (
        _batches(len(safety_encoded), gbs, cfg.seed + 7_919, start=align_steps_done * per_step * ctx.world)
        if cfg.method == "lisa"
        else None
    )
    model.train()
    bar = tqdm(
        range(start_step, cfg.steps),
        desc=f"train[{cfg.method}]",
        initial=start_step,
        total=cfg.steps,
        disable=not ctx.is_main,
    )
    for step in bar:
        t0 = time.perf_counter()
        total = 0.0
        phase = "task"
        if cfg.method == "lisa":
            phase = lisa_state(step, bl.lisa_align_steps, bl.lisa_task_steps)
            if step > start_step and lisa_last_switch(step, bl.lisa_align_steps, bl.lisa_task_steps) == step:
                # a switch: the new state is anchored where the last one left the weights
                lisa_anchor = [p.detach().clone() for p in params]
        for _ in range(cfg.grad_accum):
            if phase == "align":
                assert align_stream is not None
                idx, _pos = next(align_stream)
                rows = [safety_encoded[i] for i in idx[mine]]
            else:
                idx, _pos = next(stream)
                rows = [encoded[i] for i in idx[mine]]
            batch = {k: v.to(device) for k, v in collate(rows, pad).items()}
            loss = batch_loss(model, batch) / cfg.grad_accum
            value = float(loss.detach())
            if not math.isfinite(value) and ctx.world == 1:
                # before backward: a NaN loss would only fill every gradient with NaN (with several ranks
                # the check waits for the all-reduced loss below, so that every rank aborts together)
                raise abort(TrainingAborted("non-finite loss", step + 1, "non_finite", {"loss": value}))
            loss.backward()
            total += value
        ul_value = None
        if ul_prompts:
            # a deterministic, resumable pick of prompts for this step
            gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
            pick = torch.randint(len(ul_prompts), (ul.batch_size,), generator=gen).tolist()
            ul_batch = encode_prefix_batch(
                tokenizer, [ul_prompts[i] for i in pick], ul.prefixes, max_length=cfg.max_length
            )
            ul_loss = prefix_unlikelihood_loss(model, {k: v.to(device) for k, v in ul_batch.items()})
            ul_value = float(ul_loss.detach())
            if not math.isfinite(ul_value):
                raise abort(
                    TrainingAborted(
                        "non-finite loss (unlikelihood)",
                        step + 1,
                        "non_finite",
                        {"unlikelihood_loss": ul_value},
                    )
                )
            (ul.weight * ul_loss).backward()
        if ctx.world > 1:
            all_reduce_gradients(params)
            total = mean_over_ranks(total)
            if not math.isfinite(total):
                raise abort(TrainingAborted("non-finite loss", step + 1, "non_finite", {"loss": total}))
        baseline_rec: dict[str, Any] = {}
        if cfg.method == "safegrad" and step % bl.safegrad_every == 0:
            baseline_rec = _safegrad_surgery(model, params, safety_encoded, pad, device, cfg, step)
        elif cfg.method == "lisa":
            prox = add_proximal_grad(params, lisa_anchor, bl.lisa_rho)
            baseline_rec = {
                "lisa/state": phase,
                "lisa/is_align": float(phase == "align"),
                "lisa/proximal": prox,
            }
        # the total gradient norm (what clipping uses) is finite iff every gradient entry is
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if cfg.max_grad_norm
            else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        )
        if not math.isfinite(grad_norm):
            raise abort(
                TrainingAborted(
                    "non-finite gradient", step + 1, "non_finite", {"grad_norm": grad_norm, "loss": total}
                )
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rec: dict[str, Any] = {
            "step": step + 1,
            "loss": total,
            "lr": scheduler.get_last_lr()[0],
            "step_seconds": time.perf_counter() - t0,
        }
        if ul_value is not None:
            rec["unlikelihood_loss"] = ul_value
        if isinstance(optimizer, SPFOptimizer):
            rec.update(optimizer.last_diagnostics)
        rec.update(baseline_rec)
        history.append(rec)
        emit({"kind": "train", **rec})
        bar.set_postfix(loss=f"{total:.3f}")
        done = step + 1
        if step == start_step and start_step > 0:
            logger.info(
                "step %d done: the first after resuming (%.1f s after the start of train())",
                done,
                time.perf_counter() - t_start,
            )
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            evaluate(done)
        if cfg.save_every and done % cfg.save_every == 0 and done != cfg.steps and ctx.is_main:
            save_checkpoint(
                out,
                done,
                model,
                optimizer,
                {
                    "history": history,
                    "evals": evals,
                    "scheduler": scheduler.state_dict(),
                    "config": _resume_config(cfg),
                    "resumes": resumes,
                },
                subspace=optimizer.subspace if isinstance(optimizer, SPFOptimizer) else None,
                keep_last=cfg.keep_checkpoints,
                extra_tensors=(
                    {"lisa_anchor": dict(zip(trainable_names, lisa_anchor, strict=True))}
                    if cfg.method == "lisa"
                    else None
                ),
            )
    bar.close()
    evaluate(cfg.steps)
    model.eval()

    if not ctx.is_main:
        barrier()  # rank 0 is writing the output
        return TrainResult(
            out=out, metrics={"summary": {}, "steps": history, "evals": evals, "rank": ctx.rank}
        )
    _save_model(model, tokenizer, out, cfg)
    metrics = _summarise(
        cfg,
        history,
        evals,
        baseline={
            "n_task": len(data),
            "n_safety": len(baseline_safety),
            "safeinstr_added": len(safeinstr_added),
            "heldout_overlap_removed": heldout_overlap,
        },
    )
    metrics["resumes"] = resumes  # where this run continued from a checkpoint ([] = one uninterrupted run)
    metrics["summary"]["world_size"] = ctx.world
    save_json(metrics, out / "metrics.json")
    barrier()
    return TrainResult(out=out, metrics=metrics)


def _save_model(model, tokenizer, out: Path, cfg: TrainConfig) -> None:
    # save_pretrained writes safetensors by default; we never write pickles
    if cfg.finetune == "lora":
        model.save_pretrained(str(out), safe_serialization=True)
    else:
        unwrap(model).save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    save_json(cfg.to_dict(), out / "train_config.json")


def _summarise(
    cfg: TrainConfig, history: list[dict], evals: list[dict], baseline: dict[str, Any] | None = None
) -> dict[str, Any]:
    times = [h["step_seconds"] for h in history[1:]] or [h["step_seconds"] for h in history]
    # Lisa's alignment steps train on the safety data: the final (task) loss is the last task step's
    task_steps = [h for h in history if h.get("lisa/state", "task") == "task"]
    summary: dict[str, Any] = {
        "method": cfg.method,
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
    if cfg.method == "spf":
        summary["spf"] = {
            "mode": cfg.spf.mode,
            "project_on": cfg.spf.project_on,
            "refresh_every": cfg.spf.refresh_every,
            "rank": cfg.spf.rank,
        }
    if cfg.method in BASELINE_METHODS:
        summary.update(_summarise_baseline(cfg, history, baseline or {}))
    return {"summary": summary, "steps": history, "evals": evals}


def _summarise_baseline(cfg: TrainConfig, history: list[dict], info: dict[str, Any]) -> dict[str, Any]:
    """Flat numbers (the pipeline and MLflow keep scalars) plus the settings under ``baselines``."""
    b = cfg.baselines
    settings: dict[str, Any] = {"safety_data": b.safety_data, "n_safety": info.get("n_safety")}
    out: dict[str, Any] = {"heldout_overlap_removed": info.get("heldout_overlap_removed", 0)}
    if cfg.method == "safeinstr":
        settings["safeinstr_fraction"] = b.safeinstr_fraction
        out["safeinstr_added"] = info.get("safeinstr_added")
        out["safeinstr_n_task"] = info.get("n_task")
    elif cfg.method == "safegrad":
        settings.update(
            safegrad_batch=b.safegrad_batch, safegrad_every=b.safegrad_every, safegrad_scope=b.safegrad_scope
        )
        checks = [h for h in history if "safegrad/cos" in h]
        out["safegrad_checks"] = len(checks)
        out["safegrad_projected_steps"] = sum(h["safegrad/projected"] > 0 for h in checks)
        if checks:
            out["safegrad_mean_cos"] = sum(h["safegrad/cos"] for h in checks) / len(checks)
            out["safegrad_mean_seconds"] = sum(h["safegrad/seconds"] for h in checks) / len(checks)
            out["safegrad_safety_loss_start"] = checks[0]["safegrad/safety_loss"]
            out["safegrad_safety_loss_end"] = checks[-1]["safegrad/safety_loss"]
    else:
        settings.update(
            lisa_align_steps=b.lisa_align_steps, lisa_task_steps=b.lisa_task_steps, lisa_rho=b.lisa_rho
        )
        out["lisa_align_steps_run"] = sum(h.get("lisa/state") == "align" for h in history)
        out["lisa_task_steps_run"] = sum(h.get("lisa/state") == "task" for h in history)
        if history:
            out["lisa_mean_proximal"] = sum(h.get("lisa/proximal", 0.0) for h in history) / len(history)
    return {**out, "baselines": settings}


def _safegrad_surgery(
    model, params: list[torch.Tensor], safety_encoded: list, pad: int, device, cfg: TrainConfig, step: int
) -> dict[str, Any]:
    """SafeGrad-style step: the safety gradient g_s on a deterministic batch, then PCGrad on the accumulated
    task gradient in ``.grad`` (before clipping). One extra forward + backward; ``.grad`` is not touched by the
    safety backward (``torch.autograd.grad``)."""
    t0 = time.perf_counter()
    b = cfg.baselines
    pick = safety_batch_indices(len(safety_encoded), b.safegrad_batch, cfg.seed, step)
    batch = {k: v.to(device) for k, v in collate([safety_encoded[i] for i in pick], pad).items()}
    s_loss = batch_loss(model, batch)
    s_grads = torch.autograd.grad(s_loss, params, allow_unused=True)
    s_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, s_grads, strict=True)]
    for p in params:
        if p.grad is None:  # a parameter the task batch did not reach: its gradient is 0
            p.grad = torch.zeros_like(p)
    diag = pcgrad_project([p.grad for p in params], s_grads, b.safegrad_scope)  # type: ignore[misc]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {
        "safegrad/safety_loss": float(s_loss.detach()),
        "safegrad/cos": diag["cos"],
        "safegrad/cos_after": diag["cos_after"],
        "safegrad/projected": diag["projected"],
        "safegrad/removed_frac": diag["removed_frac"],
        "safegrad/seconds": time.perf_counter() - t0,
    }
