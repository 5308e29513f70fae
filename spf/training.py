"""One training loop for vanilla and SPF fine-tuning, over LoRA (peft) or full fine-tuning.

Metrics go to an injected ``callback(record: dict)`` — no tracking library is imported here; the MLflow
bridge lives with the pipeline. Everything the loop writes is safetensors or JSON.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from spf.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from spf.config import TrainConfig
from spf.data import ChatSample, collate, encode_sample, load_samples, pad_token_id
from spf.io import save_json
from spf.losses import batch_loss, response_loss
from spf.models import auto_device, default_target_modules, load_model, unwrap
from spf.optimizer import SPFOptimizer
from spf.subspace import SafetySubspace, estimate_batch_subspace, estimate_safety_subspace

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "load_safety_samples", "train"]

Callback = Callable[[dict[str, Any]], None]


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
    """Fine-tune ``cfg.model`` on ``cfg.data``; write the adapter/weights, ``metrics.json`` and checkpoints."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # validate the data before anything is created on disk
    data = load_samples(cfg.data, require_response=True, limit=cfg.limit_data)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device) if cfg.device else auto_device()

    model, tokenizer = _setup_model(cfg, device)
    pad = pad_token_id(tokenizer)
    encoded = [encode_sample(tokenizer, s, max_length=cfg.max_length) for s in data]

    subspace: SafetySubspace | None = None
    safety_samples: list[ChatSample] = []
    if cfg.method == "spf":
        subspace, safety_samples = _resolve_spf(cfg, model, tokenizer)
    elif cfg.spf.subspace:  # vanilla still tracks the loss on the same sample, for comparison
        safety_samples = load_safety_samples(cfg.spf.subspace)
    sample = safety_samples[0] if safety_samples else None

    heldout: list[ChatSample] = []
    if cfg.heldout_safety:
        skip = {s.sha256() for s in safety_samples}  # never evaluate on what the subspace was built from
        pool = [s for s in load_samples(cfg.heldout_safety, require_response=True) if s.sha256() not in skip]
        heldout = pool[: cfg.heldout_n]

    # a fixed slice of the training data: a less noisy task loss than the last batch's
    task_eval = data[: cfg.task_eval_n]

    params = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer: torch.optim.Optimizer = inner
    if cfg.method == "spf":
        assert subspace is not None and safety_samples
        modules = subspace.modules

        def refresh() -> SafetySubspace:
            return estimate_batch_subspace(
                model,
                tokenizer,
                safety_samples,
                rank=cfg.spf.rank,
                modules=modules,
                max_length=cfg.max_length,
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

    start_step, history, evals = 0, [], []
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state, saved_sub = load_checkpoint(ckpt, model, optimizer)
        start_step, history, evals = state["step"], state["history"], state["evals"]
        scheduler.load_state_dict(state["scheduler"])
        if saved_sub is not None and isinstance(optimizer, SPFOptimizer):
            optimizer.set_subspace(saved_sub)
        logger.info("resumed from %s at step %d", ckpt, start_step)

    def emit(record: dict[str, Any]) -> None:
        if callback is not None:
            callback(record)

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

    if start_step == 0:
        evaluate(0)
    stream = _batches(
        len(encoded), cfg.batch_size, cfg.seed, start=start_step * cfg.batch_size * cfg.grad_accum
    )
    model.train()
    bar = tqdm(range(start_step, cfg.steps), desc=f"train[{cfg.method}]", initial=start_step, total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(cfg.grad_accum):
            idx, _pos = next(stream)
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad).items()}
            loss = batch_loss(model, batch) / cfg.grad_accum
            loss.backward()
            total += float(loss.detach())
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
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
        if isinstance(optimizer, SPFOptimizer):
            rec.update(optimizer.last_diagnostics)
        history.append(rec)
        emit({"kind": "train", **rec})
        bar.set_postfix(loss=f"{total:.3f}")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            evaluate(done)
        if cfg.save_every and done % cfg.save_every == 0 and done != cfg.steps:
            save_checkpoint(
                out,
                done,
                model,
                optimizer,
                {"history": history, "evals": evals, "scheduler": scheduler.state_dict()},
                subspace=optimizer.subspace if isinstance(optimizer, SPFOptimizer) else None,
                keep_last=cfg.keep_checkpoints,
            )
    bar.close()
    evaluate(cfg.steps)
    model.eval()

    _save_model(model, tokenizer, out, cfg)
    metrics = _summarise(cfg, history, evals)
    save_json(metrics, out / "metrics.json")
    return TrainResult(out=out, metrics=metrics)


def _save_model(model, tokenizer, out: Path, cfg: TrainConfig) -> None:
    # save_pretrained writes safetensors by default; we never write pickles
    if cfg.finetune == "lora":
        model.save_pretrained(str(out), safe_serialization=True)
    else:
        unwrap(model).save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    save_json(cfg.to_dict(), out / "train_config.json")


def _summarise(cfg: TrainConfig, history: list[dict], evals: list[dict]) -> dict[str, Any]:
    times = [h["step_seconds"] for h in history[1:]] or [h["step_seconds"] for h in history]
    summary: dict[str, Any] = {
        "method": cfg.method,
        "finetune": cfg.finetune,
        "steps": cfg.steps,
        "final_loss": history[-1]["loss"] if history else None,
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
    return {"summary": summary, "steps": history, "evals": evals}
