"""The defenses as objects: one class per ``method`` (vanilla, SPF, SafeInstr, SafeGrad, Lisa), each with
the same named hooks, so the training loop (:mod:`spf.training.loop`) never branches on the method.

:func:`make_method` is the only place ``cfg.method`` picks behaviour. Adding a method (or a control) is one
class registered in :data:`METHODS`, its name in ``spf.training.config.Method``, and one test.

The loop calls the hooks in this order:

* ``prepare_data(task, safety)`` — the samples to train on (SafeInstr mixes its demos in);
* ``setup(model, tokenizer, device)`` — once the model exists; returns the (prompt, refusal) samples whose
  loss is tracked (SPF resolves or estimates its subspace here);
* ``wrap_optimizer(inner, model, tokenizer)`` — SPF wraps AdamW in :class:`SPFOptimizer`;
* ``load_state(ckpt, saved_subspace, start_step, model, params)`` — after a checkpoint is restored (or not:
  ``ckpt`` None) — the counterpart of ``state()``, what goes into checkpoints (SPF's subspace, Lisa's anchor);
* ``streams(task_rows, start_step, global_batch, per_step)`` — the resumable data stream of each phase;
* per step: ``begin_step(step, params)``, ``phase(step)``, per micro-batch ``micro_batch(rows, micro, pad,
  device)`` (a context whose ``loss(model)`` and ``backward(loss)`` the loop calls), then after the backward pass (gradients
  all-reduced, before clipping) ``after_backward(step, params) -> dict`` and after the optimizer step
  ``after_step(optimizer) -> dict``, both merged into the step's record;
* whenever the weights are written out (the final output, each exposure-curve snapshot):
  ``output_weights(params)``, a context in which the parameters hold what is published (EMA: the average);
* at the end: ``task_steps(history)`` (the steps that trained on the task) and ``summary(history, info)``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from spf.core.fused import FusedEstimate
from spf.core.losses import PlainBatch, batch_loss
from spf.core.optimizer import SPFOptimizer
from spf.core.subspace import SafetySubspace, estimate_batch_subspace, random_like, subspace_from_factors
from spf.data.samples import IGNORE_INDEX, ChatSample, DataError, collate, encode_sample, pad_token_id
from spf.training.baselines import (
    add_proximal_grad,
    lisa_last_switch,
    lisa_state,
    lisa_steps_before,
    mix_safety_demos,
    pcgrad_project,
    response_kl,
    safety_batch_indices,
)
from spf.training.checkpoint import load_extra_tensors
from spf.training.config import TrainConfig
from spf.training.start_subspace import check_subspace_matches_model, load_safety_samples, resolve_spf
from spf.training.streams import DataStream, index_batches

logger = logging.getLogger(__name__)

__all__ = [
    "EMA",
    "METHODS",
    "SPF",
    "DataStream",
    "Lisa",
    "Method",
    "MethodState",
    "SafeGrad",
    "SafeInstr",
    "Vanilla",
    "check_subspace_matches_model",
    "index_batches",
    "load_safety_samples",
    "make_method",
]


@dataclass
class MethodState:
    """What a method adds to a checkpoint: a subspace (saved as ``subspace/``) and named tensor files
    (``{name}.safetensors``, see ``save_checkpoint(extra_tensors=...)``)."""

    subspace: SafetySubspace | None = None
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class Method:
    """Plain fine-tuning; the base of every method. Each hook's default does nothing method-specific."""

    name: ClassVar[str] = "vanilla"
    uses_safety_data: ClassVar[bool] = (
        False  # loads baselines.safety_data (the loop passes it to prepare_data)
    )

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.safety: list[ChatSample] = []
        self.n_task = 0

    def prepare_data(self, task: list[ChatSample], safety: list[ChatSample]) -> list[ChatSample]:
        self.safety, self.n_task = list(safety), len(task)
        return task

    def setup(self, model, tokenizer, device: torch.device) -> list[ChatSample]:
        # without a subspace of its own, a method still tracks the loss on the sample of `spf.subspace` (when
        # set), for comparison with SPF
        return load_safety_samples(self.cfg.spf.subspace) if self.cfg.spf.subspace else []

    def wrap_optimizer(self, inner: torch.optim.Optimizer, model, tokenizer) -> torch.optim.Optimizer:
        return inner

    def load_state(
        self,
        ckpt: Path | None,
        saved_subspace: SafetySubspace | None,
        start_step: int,
        model,
        params: list[torch.Tensor],
    ) -> None:
        pass

    def streams(
        self, task_rows: Sequence[Any], start_step: int, global_batch: int, per_step: int
    ) -> dict[str, DataStream]:
        """``{phase: DataStream}``; ``per_step``: samples one optimizer step takes from a stream."""
        return {"task": DataStream(task_rows, global_batch, self.cfg.seed, start_step * per_step)}

    def phase(self, step: int) -> str:
        return "task"

    def begin_step(self, step: int, params: list[torch.Tensor]) -> None:
        pass

    @contextmanager
    def micro_batch(
        self, rows: Sequence[dict[str, list[int]]], micro: int, pad: int, device: torch.device
    ) -> Iterator[PlainBatch]:
        yield PlainBatch(rows, pad, device)

    def after_backward(self, step: int, params: list[torch.Tensor]) -> dict[str, Any]:
        return {}

    def after_step(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {}

    def state(self) -> MethodState:
        return MethodState()

    @contextmanager
    def output_weights(self, params: list[torch.Tensor]) -> Iterator[None]:
        yield

    def task_steps(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return history

    def summary(self, history: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
        return {}


class Vanilla(Method):
    name = "vanilla"


_EMA = "ema_weights"  # checkpoint file stem of the moving average


class EMA(Vanilla):
    """Vanilla training whose published weights are the exponential moving average of the iterates — the
    cheap baseline of "Rethinking Safety in LLM Fine-tuning: An Optimization Perspective" (with tuned
    lr / batch / steps). The run itself (losses, in-loop evaluations) sees the live weights."""

    name = "ema"

    def load_state(self, ckpt, saved_subspace, start_step: int, model, params: list[torch.Tensor]) -> None:
        saved = load_extra_tensors(ckpt, _EMA) if ckpt is not None else None
        if ckpt is not None and saved is None:
            raise DataError(f"{ckpt}: an ema checkpoint without {_EMA}.safetensors")
        self.params = params
        self.average = (
            [saved[str(i)] for i in range(len(params))] if saved else [p.detach().clone() for p in params]
        )

    def after_step(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        with torch.no_grad():
            torch._foreach_lerp_(
                self.average, [p.detach() for p in self.params], 1.0 - self.cfg.baselines.ema_decay
            )
        return {}

    def state(self) -> MethodState:
        return MethodState(tensors={_EMA: {str(i): t for i, t in enumerate(self.average)}})

    @contextmanager
    def output_weights(self, params: list[torch.Tensor]) -> Iterator[None]:
        live = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, live)

    def summary(self, history: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
        return {"baselines": {"ema_decay": self.cfg.baselines.ema_decay}}


# ---------------------------------------------------------------------------------------------------- SPF


_ANCHOR = "spf_anchor"  # checkpoint file stem of change=total's anchor


class SPF(Method):
    """Safety-preserving fine-tuning: every update is projected off the refusal's subspace, re-estimated
    every ``spf.refresh_every`` steps from the same sample(s)."""

    name = "spf"

    fused: FusedEstimate | None = None

    def setup(self, model, tokenizer, device: torch.device) -> list[ChatSample]:
        self.model, self.tokenizer = model, tokenizer
        self.subspace, self.samples = resolve_spf(self.cfg, model, tokenizer)
        if (
            self.cfg.spf.directions == "random"
        ):  # the control: the estimate gives the ranks, not the directions
            self._draw = self._random
            self.subspace = self._random()
            return self.samples
        if self.cfg.spf.estimate == "fused" and self.cfg.spf.refresh_every > 0:
            self.fused = FusedEstimate(
                model,
                tokenizer,
                self.samples,
                self.subspace.modules,
                pad_token_id=pad_token_id(tokenizer),
                max_length=self.cfg.max_length,
                weights=self.subspace.metadata.get("weights"),
            )
        return self.samples

    @contextmanager
    def micro_batch(
        self, rows: Sequence[dict[str, list[int]]], micro: int, pad: int, device: torch.device
    ) -> Iterator[Any]:
        # the fused estimate rides in the step's first micro-batch, on the steps that re-estimate: the
        # weights do not change between micro-batches, so one capture is the step's starting subspace
        if self.fused is None or micro != 0 or not self.optimizer.refresh_due():
            yield PlainBatch(rows, pad, device)
            return
        with self.fused.step(rows, device) as fb:
            yield fb

    def _refresh(self) -> SafetySubspace:
        return self._draw()

    def _random(self) -> SafetySubspace:
        # seeded by the run seed and the step, so a resumed run draws what the uninterrupted one would
        step = self.optimizer.num_steps if hasattr(self, "optimizer") else 0
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + 104_729 + step)
        return random_like(self.subspace, gen)

    def _draw(self) -> SafetySubspace:
        if self.fused is not None:
            return subspace_from_factors(
                self.model,
                self.subspace.modules,
                self.fused.factors(),
                self.samples,
                rank=self.cfg.spf.rank,
                n_tokens=self.fused.n_tokens,
                weights=self.subspace.metadata.get("weights"),
                estimate="fused",
            )
        return estimate_batch_subspace(
            self.model,
            self.tokenizer,
            self.samples,
            rank=self.cfg.spf.rank,
            modules=self.subspace.modules,
            max_length=self.cfg.max_length,
            # a margin subspace (refusal vs compliance pair, weights [1, -1]) is re-estimated the same way
            weights=self.subspace.metadata.get("weights"),
        )

    def wrap_optimizer(self, inner: torch.optim.Optimizer, model, tokenizer) -> torch.optim.Optimizer:
        s = self.cfg.spf
        self.optimizer = SPFOptimizer(
            inner,
            model,
            self.subspace,
            mode=s.mode,
            project_on=s.project_on,
            refresh_every=s.refresh_every,
            refresh_fn=self._refresh,
            conflict_scope=s.conflict_scope,
            diagnostics=s.diagnostics,
            removal=s.removal,
            change=s.change,
        )
        return self.optimizer

    def load_state(
        self,
        ckpt: Path | None,
        saved_subspace: SafetySubspace | None,
        start_step: int,
        model,
        params: list[torch.Tensor],
    ) -> None:
        if saved_subspace is not None:
            self.optimizer.set_subspace(saved_subspace)
        if ckpt is not None and self.cfg.spf.change == "total":
            anchor = load_extra_tensors(ckpt, _ANCHOR)
            if anchor is None:
                raise DataError(f"{ckpt}: spf.change total checkpoint without {_ANCHOR}.safetensors")
            self.optimizer.load_anchor(anchor)

    def after_step(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return dict(self.optimizer.last_diagnostics)

    def state(self) -> MethodState:
        # change=total measures from training's start: a resumed run must keep that anchor, not its own
        tensors = {_ANCHOR: self.optimizer.anchor_state()} if self.cfg.spf.change == "total" else {}
        return MethodState(subspace=self.optimizer.subspace, tensors=tensors)

    def summary(self, history: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
        s = self.cfg.spf
        used = list(self.optimizer.subspace.effective_rank.values())
        return {
            "spf": {
                "mode": s.mode,
                "project_on": s.project_on,
                "refresh_every": s.refresh_every,
                "estimate": s.estimate,
                "removal": s.removal,
                "change": s.change,
                "directions": s.directions,
                "rank": s.rank,
                # the directions actually projected out at the end (per module ≤ rank: a module's gradient
                # can have fewer), so a rank that was not honoured cannot hide behind the one asked for
                "rank_used_min": min(used, default=0),
                "rank_used_max": max(used, default=0),
            }
        }


# -------------------------------------------------------------------------------------- baseline defenses


class _Baseline(Method):
    """A defense of :mod:`spf.training.baselines`: trains on or against ``baselines.safety_data``."""

    uses_safety_data = True
    settings: tuple[str, ...] = ()  # the BaselineSettings fields this defense reads (reported in its summary)

    def _encode_safety(self, tokenizer) -> list[dict[str, Any]]:
        return [encode_sample(tokenizer, s, max_length=self.cfg.max_length) for s in self.safety]

    def _settings(self) -> dict[str, Any]:
        return {name: getattr(self.cfg.baselines, name) for name in self.settings}

    def _numbers(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def summary(self, history: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
        """Flat numbers (the pipeline and MLflow keep scalars) plus the settings under ``baselines``."""
        settings = {"safety_data": self.cfg.baselines.safety_data, "n_safety": len(self.safety)}
        out = {"heldout_overlap_removed": info.get("heldout_overlap_removed", 0), **self._numbers(history)}
        return {**out, "baselines": {**settings, **self._settings()}}


class SafeInstr(_Baseline):
    """SafeInstr: a few safety demonstrations mixed into the task data."""

    name = "safeinstr"
    settings = ("safeinstr_fraction",)

    def prepare_data(self, task: list[ChatSample], safety: list[ChatSample]) -> list[ChatSample]:
        super().prepare_data(task, safety)
        mixed, self.added = mix_safety_demos(
            task, safety, self.cfg.baselines.safeinstr_fraction, self.cfg.seed
        )
        logger.info("safeinstr: %d safety demos added to %d task samples", len(self.added), len(task))
        return mixed

    def _numbers(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {"safeinstr_added": len(self.added), "safeinstr_n_task": self.n_task}


def _safety_gradient(
    model, params: list[torch.Tensor], rows: list, pad: int, device, cfg: TrainConfig, step: int, reference
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SafeGrad's safety loss on a deterministic batch of the safety pairs and its gradient g_s (one extra
    forward + backward; ``.grad`` is not touched: ``torch.autograd.grad``)."""
    b = cfg.baselines
    pick = safety_batch_indices(len(rows), b.safegrad_batch, cfg.seed, step)
    batch = {k: v.to(device) for k, v in collate([rows[i] for i in pick], pad).items()}
    loss = _kl_to_reference(model, reference, batch) if b.safegrad_loss == "kl" else batch_loss(model, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _kl_to_reference(model, reference, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(aligned ‖ model) at the response positions (the LM head run only there, as in ``row_losses``)."""
    labels = batch["labels"]
    positions = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    kw = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "logits_to_keep": positions,
    }
    with torch.no_grad(), reference() as aligned:
        ref_logits = aligned(**kw).logits
    return response_kl(model(**kw).logits, ref_logits, labels[:, positions + 1] != IGNORE_INDEX)


def _aligned_reference(model):
    """A context factory yielding the aligned model: the LoRA model with its adapter disabled (no copy), or
    for full fine-tuning a frozen copy made before the first step (one more model in memory)."""
    if callable(getattr(model, "disable_adapter", None)):

        @contextmanager
        def adapter_off():
            with model.disable_adapter():
                yield model

        return adapter_off
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    return lambda: nullcontext(frozen)


class SafeGrad(_Baseline):
    """SafeGrad-style gradient surgery: PCGrad of the task step against a safety gradient — on the gradient
    (before clipping), or on the optimizer's update (``safegrad_project_on: update``, Adam-correct: the
    update is what moves the weights); the safety loss is the refusals' CE or SafeGrad's KL to the aligned
    model (``safegrad_loss: kl``)."""

    name = "safegrad"
    settings = ("safegrad_batch", "safegrad_every", "safegrad_scope", "safegrad_loss", "safegrad_project_on")
    _pending: tuple | None = None  # update mode: (params, pre-step copy, g_s, safety loss, seconds so far)

    def setup(self, model, tokenizer, device: torch.device) -> list[ChatSample]:
        self.model, self.device, self.pad = model, device, pad_token_id(tokenizer)
        self.safety_rows = self._encode_safety(tokenizer)
        self.reference = _aligned_reference(model) if self.cfg.baselines.safegrad_loss == "kl" else None
        return super().setup(model, tokenizer, device)

    def after_backward(self, step: int, params: list[torch.Tensor]) -> dict[str, Any]:
        if step % self.cfg.baselines.safegrad_every:
            return {}
        t0 = time.perf_counter()
        args = (self.model, params, self.safety_rows, self.pad, self.device, self.cfg, step, self.reference)
        loss, s_grads = _safety_gradient(*args)
        if self.cfg.baselines.safegrad_project_on == "update":
            snap = [p.detach().clone() for p in params]
            self._pending = (params, snap, s_grads, loss, time.perf_counter() - t0)
            return {}
        for p in params:
            if p.grad is None:  # a parameter the task batch did not reach: its gradient is 0
                p.grad = torch.zeros_like(p)
        diag = pcgrad_project([p.grad for p in params], s_grads, self.cfg.baselines.safegrad_scope)  # type: ignore[misc]
        return self._record(loss, diag, time.perf_counter() - t0)

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self._pending is None:
            return {}
        t0 = time.perf_counter()
        params, snap, s_grads, loss, seconds = self._pending
        self._pending = None
        # the update as a descent direction (the step moves along −g): PCGrad's convention
        steps = [old - p.detach() for p, old in zip(params, snap, strict=True)]
        diag = pcgrad_project(steps, s_grads, self.cfg.baselines.safegrad_scope)
        for p, old, g in zip(params, snap, steps, strict=True):
            p.copy_(old - g)
        return self._record(loss, diag, seconds + time.perf_counter() - t0)

    def _record(self, loss: torch.Tensor, diag: dict[str, float], seconds: float) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {
            "safegrad/safety_loss": float(loss.detach()),
            "safegrad/cos": diag["cos"],
            "safegrad/cos_after": diag["cos_after"],
            "safegrad/projected": diag["projected"],
            "safegrad/removed_frac": diag["removed_frac"],
            "safegrad/seconds": seconds,
        }

    def _numbers(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        checks = [h for h in history if "safegrad/cos" in h]
        out: dict[str, Any] = {
            "safegrad_checks": len(checks),
            "safegrad_projected_steps": sum(h["safegrad/projected"] > 0 for h in checks),
        }
        if checks:
            out["safegrad_mean_cos"] = sum(h["safegrad/cos"] for h in checks) / len(checks)
            out["safegrad_mean_seconds"] = sum(h["safegrad/seconds"] for h in checks) / len(checks)
            out["safegrad_safety_loss_start"] = checks[0]["safegrad/safety_loss"]
            out["safegrad_safety_loss_end"] = checks[-1]["safegrad/safety_loss"]
        return out


class Lisa(_Baseline):
    """Lisa: alignment steps (on the safety data) and task steps alternate, each state pulled towards where
    the other one left the weights by a proximal term."""

    name = "lisa"
    settings = ("lisa_align_steps", "lisa_task_steps", "lisa_rho")
    _SALT = 7_919  # the alignment stream's seed offset from the task stream's

    def setup(self, model, tokenizer, device: torch.device) -> list[ChatSample]:
        self.safety_rows = self._encode_safety(tokenizer)
        return super().setup(model, tokenizer, device)

    def _cycle(self) -> tuple[int, int]:
        return self.cfg.baselines.lisa_align_steps, self.cfg.baselines.lisa_task_steps

    def load_state(
        self,
        ckpt: Path | None,
        saved_subspace: SafetySubspace | None,
        start_step: int,
        model,
        params: list[torch.Tensor],
    ) -> None:
        # the proximal anchor is the trainable weights at the last switch between states (at step 0: the
        # starting weights); a checkpoint taken between two switches carries it
        self.start_step = start_step
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        saved = load_extra_tensors(ckpt, "lisa_anchor") if ckpt is not None else None
        if saved is not None:
            self.anchor = [saved[n].to(p.device, p.dtype) for n, p in zip(self.names, params, strict=True)]
        elif lisa_last_switch(start_step, *self._cycle()) == start_step:
            self.anchor = [p.detach().clone() for p in params]
        else:
            raise DataError(f"{ckpt}: lisa checkpoint without lisa_anchor.safetensors between two switches")

    def streams(
        self, task_rows: Sequence[Any], start_step: int, global_batch: int, per_step: int
    ) -> dict[str, DataStream]:
        # each data stream resumes where its own steps left it
        n_align, n_task = lisa_steps_before(start_step, *self._cycle())
        seed = self.cfg.seed
        return {
            "task": DataStream(task_rows, global_batch, seed, n_task * per_step),
            "align": DataStream(self.safety_rows, global_batch, seed + self._SALT, n_align * per_step),
        }

    def phase(self, step: int) -> str:
        return lisa_state(step, *self._cycle())

    def begin_step(self, step: int, params: list[torch.Tensor]) -> None:
        if step > self.start_step and lisa_last_switch(step, *self._cycle()) == step:
            # a switch: the new state is anchored where the last one left the weights
            self.anchor = [p.detach().clone() for p in params]

    def after_backward(self, step: int, params: list[torch.Tensor]) -> dict[str, Any]:
        prox = add_proximal_grad(params, self.anchor, self.cfg.baselines.lisa_rho)
        phase = self.phase(step)
        return {"lisa/state": phase, "lisa/is_align": float(phase == "align"), "lisa/proximal": prox}

    def state(self) -> MethodState:
        return MethodState(tensors={"lisa_anchor": dict(zip(self.names, self.anchor, strict=True))})

    def task_steps(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # the alignment steps train on the safety data: the final (task) loss is the last task step's
        return [h for h in history if h.get("lisa/state", "task") == "task"]

    def _numbers(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "lisa_align_steps_run": sum(h.get("lisa/state") == "align" for h in history),
            "lisa_task_steps_run": sum(h.get("lisa/state") == "task" for h in history),
        }
        if history:
            out["lisa_mean_proximal"] = sum(h.get("lisa/proximal", 0.0) for h in history) / len(history)
        return out


METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Vanilla, SPF, SafeInstr, SafeGrad, Lisa, EMA)
}  # name → class; the names are spf.training.config.Method's


def make_method(cfg: TrainConfig) -> Method:
    """The method object of ``cfg.method`` — the one place the name picks behaviour."""
    try:
        cls = METHODS[cfg.method]
    except KeyError:
        raise ValueError(f"method {cfg.method!r}: not registered (known: {', '.join(METHODS)})") from None
    return cls(cfg)
