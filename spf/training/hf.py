"""SPF inside the Hugging Face training stack: ``transformers.Trainer`` and, through the same mixin, TRL.

Three ways in, from the least to the most integrated:

* :func:`create_spf_optimizer` (the shape of peft's ``create_loraplus_optimizer``): builds the inner
  optimizer over the model's trainable parameters and wires the per-step re-estimation; pass it as
  ``Trainer(optimizers=(opt, None))``.
* :class:`SPFCallback`: a ``TrainerCallback`` that puts the optimizer's diagnostics (``spf/removed_frac``,
  ``spf/cos_before``, …, averaged over the steps since the last log) into the Trainer's logs and
  ``state.log_history``. Reporting integrations (``report_to="mlflow"``) read each log event before the
  callbacks a user passes, so :meth:`SPFCallback.attach` puts it first; the trainers below do that.
* :class:`SPFTrainerMixin` / :class:`SPFTrainer` (and ``spf.training.sft.SPFSFTTrainer`` for TRL): the
  Trainer builds its own optimizer from ``TrainingArguments`` (``optim``, learning rate, the weight-decay
  groups) over the model it trains — for ``SFTTrainer(peft_config=…)`` the peft model it creates itself —
  and the mixin wraps it, so nobody has to pre-wrap the model to build the optimizer.

The first estimate runs inside the first ``optimizer.step()`` (the optimizer is built before the weights
it will see), then every ``refresh_every`` steps (0: never again). The estimate here is the separate pass
(``estimate: separate``); the fused estimate needs the training step's own batch and is wired in
:mod:`spf.training.loop` only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from spf.core.modes import ProjectMode, ProjectOn
from spf.core.optimizer import SPFOptimizer
from spf.core.subspace import estimate_batch_subspace
from spf.data.samples import ChatSample

logger = logging.getLogger(__name__)

__all__ = ["SPFCallback", "SPFTrainer", "SPFTrainerMixin", "create_spf_optimizer", "wrap_optimizer"]

Samples = ChatSample | Sequence[ChatSample]


def _samples(sample: Samples) -> list[ChatSample]:
    samples = [sample] if isinstance(sample, ChatSample) else list(sample)
    if not samples or not all(isinstance(s, ChatSample) for s in samples):
        raise TypeError("sample must be a ChatSample (a harmful prompt and its refusal) or a list of them")
    if any(not s.response for s in samples):
        raise ValueError("every safety sample needs its refusal as the response")
    return samples


def wrap_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    tokenizer: Any,
    sample: Samples,
    *,
    rank: int,
    mode: ProjectMode = "always",
    project_on: ProjectOn = "update",
    refresh_every: int = 1,
    **spf_kwargs: Any,
) -> SPFOptimizer:
    """Wrap an existing optimizer: the subspace of ``sample`` is estimated at the first step, then every
    ``refresh_every`` steps. ``spf_kwargs`` go to :class:`SPFOptimizer` (``conflict_scope``, ``removal``,
    ``change``, ``diagnostics``) or to the estimate (``max_length``, ``modules``, ``svd``)."""
    estimate_keys = {"max_length", "modules", "spectrum_size", "svd", "model_ref", "weights"}
    estimate = {k: spf_kwargs.pop(k) for k in list(spf_kwargs) if k in estimate_keys}
    refresh = partial(estimate_batch_subspace, model, tokenizer, _samples(sample), rank=rank, **estimate)
    return SPFOptimizer(
        optimizer, model, None, mode=mode, project_on=project_on, refresh_every=refresh_every,
        refresh_fn=refresh, **spf_kwargs,
    )  # fmt: skip


def create_spf_optimizer(
    model: nn.Module,
    tokenizer: Any,
    sample: Samples,
    *,
    rank: int,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    mode: ProjectMode = "always",
    project_on: ProjectOn = "update",
    refresh_every: int = 1,
    spf_kwargs: dict[str, Any] | None = None,
    **optimizer_kwargs: Any,
) -> SPFOptimizer:
    """``optimizer_cls(trainable parameters, **optimizer_kwargs)`` wrapped by SPF (see :func:`wrap_optimizer`).

    >>> opt = create_spf_optimizer(peft_model, tok, sample, rank=8, lr=1e-3)
    >>> Trainer(model=peft_model, args=args, optimizers=(opt, None), callbacks=[SPFCallback()])
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: wrap it with peft (get_peft_model) first")
    inner = optimizer_cls(params, **optimizer_kwargs)
    return wrap_optimizer(
        inner, model, tokenizer, sample, rank=rank, mode=mode, project_on=project_on,
        refresh_every=refresh_every, **(spf_kwargs or {}),
    )  # fmt: skip


def find_spf_optimizer(optimizer: Any) -> SPFOptimizer | None:
    """The SPFOptimizer inside accelerate's (or anyone's) ``.optimizer`` wrappers, if there is one."""
    for _ in range(8):  # AcceleratedOptimizer → SPFOptimizer; a bounded walk, wrappers do not nest deeper
        if isinstance(optimizer, SPFOptimizer) or optimizer is None:
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class SPFCallback(TrainerCallback):
    """Adds SPF's diagnostics, averaged over the optimizer steps since the last log event, to every log.

    Passed in ``Trainer(callbacks=[SPFCallback()])`` they reach the console and ``state.log_history``;
    ``SPFCallback.attach(trainer)`` runs it before the reporting integrations so ``report_to`` backends
    (MLflow, TensorBoard, W&B) log them too.
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._steps = 0
        self._first = False
        self._warned = False

    @classmethod
    def attach(cls, trainer: Trainer) -> SPFCallback:
        """Put an SPFCallback first in ``trainer``'s callbacks (replacing any it had); returns it."""
        handler = trainer.callback_handler
        handler.callbacks = [cb for cb in handler.callbacks if not isinstance(cb, cls)]
        callback = cls()
        callback._first = True
        handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if find_spf_optimizer(optimizer) is None and not self._warned:
            logger.warning("SPFCallback: the Trainer's optimizer is not an SPFOptimizer; nothing to log")
            self._warned = True
        reporters = [r for r in (args.report_to or []) if r != "none"]
        if reporters and not self._first:
            logger.warning(
                "SPFCallback runs after the report_to integrations %s, which will not see the spf/ keys: "
                "use SPFCallback.attach(trainer) (or spf.SPFTrainer)", reporters,
            )  # fmt: skip

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        opt = find_spf_optimizer(optimizer)
        if opt is None or not opt.last_diagnostics:
            return
        for key, value in opt.last_diagnostics.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._steps:
            return
        means = {key: total / self._steps for key, total in self._sums.items()}
        logs.update(means)
        # the Trainer appended a copy of this event to log_history just before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(means)
        self._sums, self._steps = {}, 0


class SPFTrainerMixin:
    """Wraps the optimizer the Trainer builds from its ``TrainingArguments`` with SPF and logs diagnostics.

    ``spf_sample``: the (harmful prompt, refusal) :class:`ChatSample` (or several); ``spf_rank``; the rest
    as :func:`wrap_optimizer`. The estimate uses the Trainer's ``processing_class`` as the tokenizer.
    """

    def __init__(
        self,
        *args: Any,
        spf_sample: Samples,
        spf_rank: int = 8,
        spf_mode: ProjectMode = "always",
        spf_project_on: ProjectOn = "update",
        spf_refresh_every: int = 1,
        spf_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.spf_settings = {
            "sample": _samples(spf_sample), "rank": spf_rank, "mode": spf_mode,
            "project_on": spf_project_on, "refresh_every": spf_refresh_every, **(spf_kwargs or {}),
        }  # fmt: skip
        super().__init__(*args, **kwargs)
        SPFCallback.attach(self)  # type: ignore[arg-type]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        inner = super().create_optimizer(model)  # type: ignore[misc]
        if isinstance(inner, SPFOptimizer):  # created already (create_optimizer may run twice)
            return inner
        opt_model = self.model if model is None else model  # type: ignore[attr-defined]
        tokenizer = getattr(self, "processing_class", None)
        if tokenizer is None:
            raise ValueError("SPF needs the tokenizer: pass processing_class=tokenizer to the Trainer")
        settings = dict(self.spf_settings)
        sample = settings.pop("sample")
        self.optimizer = wrap_optimizer(inner, opt_model, tokenizer, sample, **settings)
        return self.optimizer


class SPFTrainer(SPFTrainerMixin, Trainer):
    """``transformers.Trainer`` with SPF: ``SPFTrainer(model=…, args=…, spf_sample=sample, spf_rank=8, …)``."""
