"""The fused re-estimate: the safety sample rides along in the training batch — one forward, one backward.

Rows of a causal LM batch do not interact, so appending the safety sample(s) as extra rows and running one
backward of ``task_loss + safety_loss`` gives, at every target module, the output gradient of the safety
rows alone: the factors ``D`` and ``X`` of ``G = Dᵀ X`` (:mod:`spf.core.gradients`), at the step's own
starting weights, for about ``1/(B+1)`` of a step instead of a second forward and backward.

Two things keep the task gradient exactly that of the task rows:

* **routing** — every module that owns trainable parameters computes its safety rows with those parameters
  *detached* (same value; autograd sees no path from a safety row to a parameter). A linear layer (LoRA's
  A and B, every weight of full fine-tuning) does it in one op, :class:`_TaskRowsLinear`, whose backward sums
  the weight gradient over the task rows only — no second product, no copy of the output; other modules
  (embeddings, norms) recompute their safety rows with detached parameters. Nothing ever lands in
  ``.grad``, so gradient accumulation, clipping, all-reduce and a ``Trainer`` all see the pure task
  gradient; no subtraction after the fact (which would leave rounding residue and depend on the order of
  clipping). Gradients still flow through the safety rows' activations, which is what ``D`` needs.
* **dropout** — the separate estimate runs in eval mode, so ``nn.Dropout`` modules pass the safety rows
  through unchanged. Dropout applied functionally inside a module (attention dropout) cannot be routed;
  :func:`functional_dropout` names it so the caller can warn.

Rows are right-padded (:func:`spf.data.samples.collate`), so the safety rows' positions and mask match
what they would be alone; their padded tokens are dropped from the factors, and rows that share a prompt
(a margin pair) are merged exactly as the separate estimate merges them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spf.core.gradients import _shared_prefix_rows, merge_shared_rows
from spf.core.losses import row_losses
from spf.data.samples import ChatSample, collate, encode_sample
from spf.models import unwrap

logger = logging.getLogger(__name__)

__all__ = ["FusedBatch", "FusedError", "FusedEstimate", "functional_dropout"]

# config keys under which Hugging Face models declare dropout applied inside a module's forward
_FUNCTIONAL_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "hidden_dropout", "resid_pdrop", "embd_pdrop")


class FusedError(RuntimeError):
    """The fused estimate cannot run on this model or batch (the message says why and what to use)."""


def functional_dropout(model: nn.Module) -> dict[str, float]:
    """Dropout probabilities > 0 in the model's config that act inside a forward (not an ``nn.Dropout``):
    in train mode the safety rows see them, and the fused estimate then differs from the separate one."""
    config = getattr(unwrap(model), "config", None)
    found = {k: getattr(config, k, 0.0) for k in _FUNCTIONAL_DROPOUT_KEYS}
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float)) and v > 0}


class FusedBatch:
    """One micro-batch with the safety rows appended; :meth:`loss` and :meth:`backward` inside
    :meth:`FusedEstimate.step`."""

    def __init__(self, estimate: FusedEstimate, batch: dict[str, Tensor], n_task: int) -> None:
        self.estimate = estimate
        self.batch = batch
        self.n_task = n_task
        self.safety_loss: Tensor | None = None

    def loss(self, model: nn.Module) -> Tensor:
        """The task loss (mean over the task rows of each row's mean token loss, as ``batch_loss``); the
        safety rows' loss is kept for :meth:`backward`."""
        per_row = row_losses(model, self.batch)
        weights = self.estimate.weights.to(per_row)
        self.safety_loss = (per_row[self.n_task :] * weights).mean()
        return per_row[: self.n_task].mean()

    def backward(self, task_loss: Tensor) -> None:
        """One backward of ``task_loss + safety_loss``; routing keeps the second out of every ``.grad``."""
        if self.safety_loss is None:
            raise FusedError("FusedBatch.backward before FusedBatch.loss")
        (task_loss + self.safety_loss).backward()


class FusedEstimate:
    """Captures the safety gradient's factors from the training step's own backward.

    ``with est.step(rows) as fb: loss = fb.loss(model); fb.backward(loss)`` then :meth:`factors` (or
    ``spf.core.subspace.subspace_from_factors``). ``samples`` and ``weights`` are those of the separate
    estimate (one refusal; a margin pair with ``[1, -1]``; several samples).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        samples: Sequence[ChatSample],
        modules: Sequence[str],
        *,
        pad_token_id: int,
        max_length: int = 512,
        weights: Sequence[float] | None = None,
    ) -> None:
        if not samples:
            raise ValueError("no safety samples to ride along")
        if weights is not None and len(weights) != len(samples):
            raise ValueError(f"weights: expected {len(samples)} values (one per sample), got {len(weights)}")
        self.encoded = [encode_sample(tokenizer, s, max_length=max_length) for s in samples]
        self.weights = torch.tensor([1.0] * len(samples) if weights is None else list(weights))
        self.pad = pad_token_id
        lookup = dict(unwrap(model).named_modules())
        missing = [n for n in modules if n not in lookup]
        if missing:
            raise ValueError(f"modules not found in the model: {missing[:5]}")
        self.names = list(modules)
        self._targets = [lookup[n] for n in self.names]
        self._owners = _parameter_owners(unwrap(model))
        # plain linear layers route in one op (their forward patched for the block); the rest by a hook
        self._linears = [m for m in self._owners if _patchable(m)]
        self._hooked = [m for m in self._owners if not _patchable(m)]
        self._captured: tuple[list[Tensor], list[Tensor], Tensor] | None = None
        self.n_tokens = sum(int(sum(e["attention_mask"])) for e in self.encoded)
        dropout = functional_dropout(model)
        if dropout:
            logger.warning(
                "fused estimate: the model applies dropout inside its forward (%s); in train mode the safety "
                "rows see it, so the subspace is noisier than the separate (eval-mode) estimate",
                dropout,
            )

    @property
    def n_safety(self) -> int:
        """Safety rows appended to each fused micro-batch."""
        return len(self.encoded)

    @contextmanager
    def step(self, rows: Sequence[dict[str, list[int]]], device: torch.device | str) -> Iterator[FusedBatch]:
        """Collate ``rows`` (encoded task samples) with the safety rows last, route and capture during the
        forward and backward run inside the block; the factors are ready after it."""
        n_task = len(rows)
        batch = {k: v.to(device) for k, v in collate([*rows, *self.encoded], self.pad).items()}
        keep = batch["attention_mask"][n_task:].bool()
        fb = FusedBatch(self, batch, n_task)
        inputs: dict[int, tuple[Tensor, int]] = {}
        grads: dict[int, Tensor] = {}
        n_rows = n_task + self.n_safety
        handles = [m.register_forward_hook(_router(n_task, n_rows)) for m in self._hooked]
        handles += [
            m.register_forward_hook(_capturer(i, n_task, keep, inputs, grads))
            for i, m in enumerate(self._targets)
        ]
        self._captured = None
        try:
            for (
                m
            ) in self._linears:  # an instance attribute, removed after the block: the class's forward returns
                m.forward = _routed_forward(m, n_task, n_rows)
            yield fb
        finally:
            for h in handles:
                h.remove()
            for m in self._linears:
                m.__dict__.pop("forward", None)
        if fb.safety_loss is None or not grads:
            return  # no forward or no backward inside the block: nothing captured
        self._captured = self._assemble(batch, n_task, keep, inputs, grads, fb.safety_loss.detach())

    def _assemble(
        self, batch, n_task, keep, inputs, grads, loss
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """``(ds, xs, loss)`` in ``names`` order, shared prompt tokens merged as the separate estimate does."""
        merge = _shared_prefix_rows(batch["input_ids"][n_task:], keep)
        ds, xs = [], []
        for i, name in enumerate(self.names):
            if i not in inputs:
                raise FusedError(f"fused estimate: target module '{name}' did not run in the forward")
            x, width = inputs[i]
            d = grads.get(i)
            if d is None:  # the module's output got no gradient (nothing after it is supervised)
                d = torch.zeros(x.shape[0], width, dtype=x.dtype, device=x.device)
            d, x = merge_shared_rows(d, x, merge)
            ds.append(d)
            xs.append(x)
        return ds, xs, loss

    def factors(self) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """The last completed step's ``(ds, xs, safety_loss)``; FusedError when no step captured them."""
        if self._captured is None:
            raise FusedError(
                "no fused capture for this step: the training loop must run its forward and backward inside "
                "FusedEstimate.step() on every step that re-estimates (or use the separate estimate)"
            )
        out, self._captured = self._captured, None
        return out


def _parameter_owners(base: nn.Module) -> list[nn.Module]:
    """Modules that own trainable parameters directly, plus active dropout modules: what routing hooks."""
    owners = []
    for name, module in base.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and any(p.requires_grad for c in module.children() for p in c.parameters()):
            raise FusedError(
                f"fused estimate: module '{name}' owns trainable parameters and has children that do too; "
                "its safety rows cannot be routed — use spf.estimate: separate"
            )
        if own or (isinstance(module, nn.Dropout) and module.p > 0):
            owners.append(module)
    return owners


class _TaskRowsLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` over all rows, whose weight (and bias) gradient sums over the first ``n_task`` rows
    only: the safety rows' output gradient flows on to ``x`` (their ``D`` upstream) but never into W."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, n_task: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.n_task, ctx.has_bias = n_task, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        n = ctx.n_task
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        g_task = g[:n].reshape(-1, g.shape[-1])
        grad_w = g_task.T @ x[:n].reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = g_task.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _patchable(module: nn.Module) -> bool:
    """A plain linear layer whose forward nobody else has replaced (accelerate's hooks patch the instance)."""
    return type(module) is nn.Linear and "forward" not in module.__dict__


def _routed_forward(module: nn.Linear, n_task: int, n_rows: int):
    def forward(x: Tensor) -> Tensor:
        if x.shape[0] != n_rows:
            raise FusedError(
                f"fused estimate: a linear layer got {x.shape[0]} rows, not the batch's {n_rows}; its safety "
                "rows cannot be routed — use spf.estimate: separate"
            )
        return _TaskRowsLinear.apply(x, module.weight, module.bias, n_task)

    return forward


def _router(n_task: int, n_rows: int):
    """Forward hook: recompute the safety rows' output with detached parameters (or without dropout)."""

    busy: set[int] = set()  # modules recomputing their safety rows: the recompute re-enters this hook

    def hook(module: nn.Module, args: tuple, out: Any) -> Tensor | None:
        if id(module) in busy:
            return None
        x = args[0] if args else None
        if not isinstance(out, Tensor) or not isinstance(x, Tensor) or x.shape[0] != n_rows:
            raise FusedError(
                f"fused estimate: {type(module).__name__} does not take and return one batch-first tensor "
                f"of {n_rows} rows; its safety rows cannot be routed — use spf.estimate: separate"
            )
        if isinstance(module, nn.Dropout):
            if not module.training:
                return None
            safe = x[n_task:]
        elif isinstance(module, nn.Linear):
            bias = module.bias.detach() if module.bias is not None else None
            safe = F.linear(x[n_task:], module.weight.detach(), bias)
        else:  # any other module (embeddings, norms): its own forward with its parameters detached
            params = {n: p.detach() for n, p in module.named_parameters(recurse=False)}
            busy.add(id(module))
            try:
                safe = torch.func.functional_call(module, params, (x[n_task:],))
            finally:
                busy.discard(id(module))
        return torch.cat([out[:n_task], safe.to(out.dtype)], 0)

    return hook


def _capturer(
    i: int, n_task: int, keep: Tensor, inputs: dict[int, tuple[Tensor, int]], grads: dict[int, Tensor]
):
    """Forward hook on target ``i``: keep its safety rows' kept inputs and its output width; a tensor hook
    keeps their output gradient when the backward reaches it."""

    def hook(_module: nn.Module, args: tuple, out: Tensor) -> None:
        inputs[i] = (args[0][n_task:][keep].detach(), out.shape[-1])
        if out.requires_grad:

            def keep_grad(g: Tensor) -> None:
                grads[i] = g[n_task:][keep].detach()

            out.register_hook(keep_grad)

    return hook
