"""The one estimate-to-folder recipe: pick the safety sample(s), estimate the subspace, publish the folder.

``spf estimate``, the pipeline's estimate stage and ``spf bench`` all do select → estimate → publish; it lives
here once so the three cannot drift (same sample choice, same folder layout). It sits above the core
(:mod:`spf.core.subspace` is pure torch and writes no files) and above :mod:`spf.refusal` (which generates
the model's own refusal), below the training loop that re-estimates from the published ``sample.jsonl``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from spf.core.subspace import SafetySubspace, SubspaceLoss, estimate_from_samples
from spf.data.samples import ChatSample, save_samples
from spf.io import atomic_dir, claim_output, save_json
from spf.refusal import select_safety_samples

logger = logging.getLogger(__name__)

__all__ = ["CER_KS", "cer_table", "estimate_to_folder", "publish_estimate"]

# the k at which a published estimate reports its CER (cer.json, the CLI table)
CER_KS = (1, 5, 10, 20)


def publish_estimate(sub: SafetySubspace, samples: Sequence[ChatSample], dest: str | Path) -> Path:
    """Write an estimate as one folder: the subspace, the sample(s) it came from (``sample.jsonl`` — what a
    reader needs to reproduce or audit it, and what training re-estimates from) and the CER at
    k = 1, 5, 10, 20, mean and per module (``cer.json``). Built beside ``dest`` and renamed into place, so a
    reader never sees half a folder."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        sub.save(tmp)
        save_samples(list(samples), tmp / "sample.jsonl")
        cer = {
            "mean": {str(k): sub.mean_cer(k) for k in CER_KS},
            "per_module": {str(k): sub.cer(k) for k in CER_KS},
        }
        save_json(cer, tmp / "cer.json")
    return dest


def cer_table(sub: SafetySubspace, ks: Sequence[int] = CER_KS) -> str:
    """Plain-text table: per module CER@k, plus the mean row."""
    cers = {k: sub.cer(k) for k in ks}
    width = max((len(n) for n in sub.modules), default=6)
    lines = [f"{'module':<{width}}  " + "  ".join(f"CER@{k:<3}" for k in ks)]
    for name in sub.modules:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{cers[k][name]:7.3f}" for k in ks))
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{sub.mean_cer(k):7.3f}" for k in ks))
    return "\n".join(lines)


def estimate_to_folder(
    model: nn.Module,
    tokenizer: Any,
    candidates: list[ChatSample],
    *,
    out: str | Path,
    rank: int,
    n: int = 1,
    own_response: bool = True,
    index: int | None = None,
    loss: SubspaceLoss = "ce",
    max_length: int = 512,
    max_new_tokens: int = 64,
    modules: Sequence[str] | None = None,
    model_ref: str | None = None,
    metadata: dict[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> tuple[SafetySubspace, list[ChatSample], float]:
    """Select the safety sample(s) from ``candidates``, estimate the subspace, publish it to ``out``.

    Selection is :func:`spf.refusal.select_safety_samples` (``n``, ``own_response``, ``index``,
    ``max_new_tokens``); estimation is :func:`spf.core.subspace.estimate_from_samples` (``rank``, ``loss``,
    ``max_length``, ``modules``, ``model_ref``); ``metadata`` (e.g. the benchmark's spec) is merged into the
    subspace's metadata before it is written. Returns the subspace, the samples it was estimated from
    (for ``loss="margin"`` the refusal/compliance pairs — what ``sample.jsonl`` holds) and the seconds the
    estimate took (selection, which generates text, is not counted: the paper's cost is the estimate).

    ``out`` may not be (or hold, or lie inside) ``model_ref`` or any of ``inputs`` (``{flag: path}``, e.g.
    the sample file), and is locked against a second writer while the estimate runs.
    """
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    with claim_output(out, inputs={"--model": model_ref, **(inputs or {})}):
        return _estimate_and_publish(
            model, tokenizer, candidates, out, rank=rank, n=n, own_response=own_response, index=index,
            loss=loss, max_length=max_length, max_new_tokens=max_new_tokens, modules=modules,
            model_ref=model_ref, metadata=metadata,
        )  # fmt: skip


def _estimate_and_publish(
    model: nn.Module,
    tokenizer: Any,
    candidates: list[ChatSample],
    out: str | Path,
    *,
    rank: int,
    n: int,
    own_response: bool,
    index: int | None,
    loss: SubspaceLoss,
    max_length: int,
    max_new_tokens: int,
    modules: Sequence[str] | None,
    model_ref: str | None,
    metadata: dict[str, Any] | None,
) -> tuple[SafetySubspace, list[ChatSample], float]:
    samples = select_safety_samples(
        model,
        tokenizer,
        candidates,
        n=n,
        own_response=own_response,
        index=index,
        max_new_tokens=max_new_tokens,
    )
    t0 = time.perf_counter()
    sub, used = estimate_from_samples(
        model,
        tokenizer,
        samples,
        rank=rank,
        loss=loss,
        modules=modules,
        max_length=max_length,
        model_ref=model_ref,
    )
    seconds = time.perf_counter() - t0
    if metadata:
        sub.metadata.update(metadata)
    publish_estimate(sub, used, out)
    logger.info(
        "published a rank-%d safety subspace (%d modules, %d sample(s), %.2fs) to %s",
        sub.rank,
        len(sub.modules),
        len(samples),
        seconds,
        out,
    )
    return sub, used, seconds
