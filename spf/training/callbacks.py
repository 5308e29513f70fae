"""What the training loop does besides training, as small objects: the safety monitor (evaluation and the
fault aborts), the checkpointer, and the emitter of metric records.

``on_step_end(run, done)`` is called after every optimizer step (``done``: steps finished, 1-based); ``run``
is the loop's ``_Run`` (model, optimizer, scheduler, history, method, …).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spf.core.losses import response_loss
from spf.data.samples import ChatSample
from spf.io import atomic_dir, save_json
from spf.training.checkpoint import (
    FINISHED_CONFIG,
    result_key,
    resume_config,
    save_checkpoint,
    save_finetuned,
    snapshot_config,
    snapshot_dir,
)
from spf.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "ABORT_FILE",
    "Aborter",
    "Checkpointer",
    "Emitter",
    "SafetyMonitor",
    "Snapshotter",
    "TrainingAborted",
]

Callback = Callable[[dict[str, Any]], None]

ABORT_FILE = "abort.json"
_SAFETY_KEYS = ("safety_loss_heldout", "safety_loss_sample")  # the tracked refusal losses drift is tested on


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


class Emitter:
    """Hands each metric record to the injected ``callback(record)`` — on rank 0 only, though every rank
    computes the same records (no tracking library is imported here)."""

    def __init__(self, callback: Callback | None, is_main: bool) -> None:
        self.callback, self.is_main = callback, is_main

    def __call__(self, record: dict[str, Any]) -> None:
        if self.callback is not None and self.is_main:
            self.callback(record)


class Aborter:
    """Records a fault where the finished output would be (``abort.json``; an older run's ``metrics.json``,
    its completion marker, removed), then hands the exception back to raise."""

    def __init__(self, out: Path, cfg: TrainConfig, is_main: bool) -> None:
        self.out, self.cfg, self.is_main = out, cfg, is_main

    def __call__(self, exc: TrainingAborted) -> TrainingAborted:
        if self.is_main:
            (self.out / "metrics.json").unlink(missing_ok=True)
            record = {**exc.to_dict(), "method": self.cfg.method, "config": self.cfg.to_dict()}
            save_json(record, self.out / ABORT_FILE)
        exc.path = self.out / ABORT_FILE
        logger.error("training aborted: %s at step %d (%s)", exc.reason, exc.step, exc.path)
        return exc


class SafetyMonitor:
    """Evaluates the tracked losses at step 0, every ``eval_every`` steps and at the end, and aborts on a
    non-finite one or — with ``abort_safety_rise`` — on a refusal loss that rose above its step-0 value by
    more than that bound.

    ``sample``: the estimation sample (its loss is ``safety_loss_sample``); ``heldout``: held-out
    (prompt, refusal) pairs; ``task_eval``: a fixed slice of the training data, a less noisy task loss than
    the last batch's. ``evals``: the records so far (restored from a checkpoint on resume).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model,
        tokenizer,
        sample: ChatSample | None,
        heldout: list[ChatSample],
        task_eval: list[ChatSample],
        evals: list[dict[str, Any]],
        emit: Emitter,
        abort: Aborter,
    ) -> None:
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.sample, self.heldout, self.task_eval = sample, heldout, task_eval
        self.evals, self.emit, self.abort = evals, emit, abort

    def _mean_loss(self, samples: list[ChatSample]) -> float:
        losses = response_loss(self.model, self.tokenizer, samples, max_length=self.cfg.max_length)
        return sum(losses) / len(losses)

    def evaluate(self, step: int) -> None:
        rec: dict[str, Any] = {"step": step}
        if self.sample is not None:
            rec["safety_loss_sample"] = self._mean_loss([self.sample])
        if self.heldout:
            rec["safety_loss_heldout"] = self._mean_loss(self.heldout)
        if self.task_eval:
            rec["task_loss"] = self._mean_loss(self.task_eval)
        if len(rec) > 1:
            self.evals.append(rec)
            self.emit({"kind": "eval", **rec})
            self.check(rec)

    def check(self, rec: dict[str, Any]) -> None:
        step = rec["step"]
        bad = {k: v for k, v in rec.items() if k != "step" and not math.isfinite(v)}
        if bad:
            raise self.abort(
                TrainingAborted(f"non-finite eval loss ({', '.join(bad)})", step, "non_finite", bad)
            )
        bound, first = self.cfg.abort_safety_rise, self.evals[0] if self.evals else None
        if bound is None or first is None or first is rec:
            return
        for key in _SAFETY_KEYS:
            if key in rec and key in first:
                start, now = first[key], rec[key]
                if now - start > bound:
                    reason = (
                        f"safety drift: {key} rose by {now - start:.4f} "
                        f"(from {start:.4f} at step {first['step']} to {now:.4f}), above abort_safety_rise {bound:g}"
                    )
                    values = {
                        key: now,
                        f"{key}_start": start,
                        "rise": now - start,
                        "abort_safety_rise": bound,
                    }
                    raise self.abort(TrainingAborted(reason, step, "safety_drift", values))

    def on_step_end(self, run: Any, done: int) -> None:
        every = self.cfg.eval_every
        if every and done % every == 0 and done != self.cfg.steps:  # the final evaluation is the loop's
            self.evaluate(done)


class Checkpointer:
    """Every ``save_every`` steps (not at the end: the final output is written instead), rank 0 saves a
    resumable checkpoint: trainable weights, optimizer, scheduler, history, evals, the resume key, and the
    method's state (``method.state()``: SPF's subspace, Lisa's anchor); ``keep_checkpoints`` are kept."""

    def __init__(self, cfg: TrainConfig, out: Path, is_main: bool) -> None:
        self.cfg, self.out, self.is_main = cfg, out, is_main

    def on_step_end(self, run: Any, done: int) -> None:
        every = self.cfg.save_every
        if not (every and done % every == 0 and done != self.cfg.steps and self.is_main):
            return
        trainer_state = {
            "history": run.history,
            "evals": run.monitor.evals,
            "scheduler": run.scheduler.state_dict(),
            "config": resume_config(self.cfg),
            "resumes": run.resumes,
        }
        extra = run.method.state()
        save_checkpoint(
            self.out,
            done,
            run.model,
            run.optimizer,
            trainer_state,
            subspace=extra.subspace,
            keep_last=self.cfg.keep_checkpoints,
            extra_tensors=extra.tensors or None,
        )


class Snapshotter:
    """After each optimizer step N of ``snapshot_steps``, rank 0 publishes ``out/snapshots/step-N/``: what
    the final output of an N-step run of this configuration holds (:func:`save_finetuned`, with the N-step
    ``train_config.json``), built in a temporary folder and renamed into place, so an exposure curve costs
    one training run, not one per point, and a crash never leaves half a snapshot. A snapshot of this
    configuration already there (written before a crash and resume) is kept as it is."""

    def __init__(self, cfg: TrainConfig, out: Path, is_main: bool) -> None:
        self.cfg, self.out, self.is_main = cfg, out, is_main

    def on_step_end(self, run: Any, done: int) -> None:
        if done not in self.cfg.snapshot_steps or not self.is_main:
            return
        dest, config = snapshot_dir(self.out, done), snapshot_config(self.cfg, done)
        if _same_run(dest / FINISHED_CONFIG, config):
            logger.info("snapshot %s exists (a resumed run): kept", dest)
            return
        with atomic_dir(dest) as tmp, run.method.output_weights(run.params):
            save_finetuned(run.model, run.tokenizer, tmp, config)
        logger.info("saved snapshot %s", dest)


def _same_run(saved: Path, config: dict[str, Any]) -> bool:
    """Whether ``saved`` (a snapshot's train_config.json) records the run ``config`` describes: a folder
    left by a run of other settings (no checkpoint to refuse it) must be replaced, not reused."""
    try:
        old = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    new = json.loads(json.dumps(config, default=str))  # tuples → lists, as in the file
    return isinstance(old, dict) and result_key(old) == result_key(new)
