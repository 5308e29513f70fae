"""Where SPF's subspace at step 0 comes from: a folder of `spf estimate`, verified against the model being
trained, or an estimate from ``spf.sample`` — kept apart from the method objects (spf.training.methods)."""

from __future__ import annotations

import logging
from pathlib import Path

from spf.core.subspace import (
    SafetySubspace,
    check_rank_available,
    estimate_batch_subspace,
    estimate_safety_subspace,
    module_shapes,
    weights_fingerprint,
)
from spf.data.samples import ChatSample, DataError, load_samples
from spf.models import model_fingerprint
from spf.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["check_subspace_matches_model", "load_safety_samples", "resolve_spf"]


def load_safety_samples(subspace_dir: str | Path) -> list[ChatSample]:
    """The (prompt, refusal) sample(s) `spf estimate` stored next to the subspace, for re-estimation.

    One sample for SPF proper; several when the folder holds a batch estimate (an ablation).
    """
    return load_samples(Path(subspace_dir) / "sample.jsonl", require_response=True)


_RANK_FLAG = "--rank / spf.rank"


def resolve_spf(cfg: TrainConfig, model, tokenizer) -> tuple[SafetySubspace, list[ChatSample]]:
    """SPF's subspace at step 0 and its sample(s): the ``spf.subspace`` folder, or estimated from
    ``spf.sample`` (its record, or the first one the model refuses, with the model's own refusal)."""
    s = cfg.spf
    if s.subspace:
        return _stored_subspace(cfg, model, tokenizer)
    from spf.refusal import first_refused, own_refusal  # generation is only needed here

    candidates = load_samples(s.sample)  # type: ignore[arg-type]
    if s.sample_index is not None:
        if not 0 <= s.sample_index < len(candidates):
            raise DataError(f"{s.sample}: index {s.sample_index} out of range (0..{len(candidates) - 1})")
        cand = candidates[s.sample_index]
        sample = cand if cand.response else own_refusal(model, tokenizer, cand)
    else:
        with_resp = [c for c in candidates if c.response]
        sample = with_resp[0] if with_resp else first_refused(model, tokenizer, candidates)
    sub = estimate_safety_subspace(
        model, tokenizer, sample, rank=s.rank, max_length=cfg.max_length, model_ref=cfg.model
    )
    check_rank_available(sub, s.rank, _RANK_FLAG, f"the safety sample of {s.sample}")
    return sub, [sample]


def _stored_subspace(cfg: TrainConfig, model, tokenizer) -> tuple[SafetySubspace, list[ChatSample]]:
    """The ``spf.subspace`` folder, verified against the model being trained, at the rank asked for."""
    s, folder = cfg.spf, Path(cfg.spf.subspace)  # type: ignore[arg-type]
    sub = SafetySubspace.load(folder)
    check_subspace_matches_model(sub, folder, model, cfg.model)
    samples = load_safety_samples(folder)
    held = max(sub.effective_rank.values(), default=0)
    if s.rank < held:
        return sub.truncate(s.rank), samples
    if s.rank > held:
        if not s.refresh_every:
            raise DataError(
                f"{_RANK_FLAG} {s.rank} is more than the subspace in {folder} holds ({held} directions per "
                f"module at most) and spf.refresh_every is 0 (never re-estimated): use {_RANK_FLAG} ≤ {held}, "
                f"or re-run `spf estimate --rank {s.rank}`"
            )
        # the first refresh re-estimates at spf.rank from sample.jsonl: check now that the sample has that many
        probe = estimate_batch_subspace(
            model, tokenizer, samples, rank=s.rank, modules=sub.modules, max_length=cfg.max_length,
            weights=sub.metadata.get("weights"),
        )  # fmt: skip
        check_rank_available(probe, s.rank, _RANK_FLAG, f"the safety sample in {folder / 'sample.jsonl'}")
        logger.warning(
            "subspace folder %s holds %d directions < spf.rank %d: using %d until the first refresh",
            folder, held, s.rank, held,
        )  # fmt: skip
    return sub, samples


def check_subspace_matches_model(sub: SafetySubspace, folder: Path, model, model_ref: str) -> None:
    """DataError naming ``folder`` when the subspace was not estimated on this model: another architecture
    (config fingerprint), other module shapes, or the same architecture with other weights."""
    meta = sub.metadata
    recorded = meta.get("model_fingerprint")
    if not recorded:
        raise DataError(
            f"{folder / 'subspace.json'}: no model fingerprint (written by an older spf): re-run "
            f"`spf estimate --model {model_ref}` to rebuild it"
        )
    was = f"{meta.get('model_ref') or 'an unnamed model'} (fingerprint {recorded})"
    current = model_fingerprint(model)
    if recorded != current:
        raise DataError(
            f"{folder}: the subspace was estimated on {was}, not on the model being trained, {model_ref} "
            f"(fingerprint {current}): re-run `spf estimate --model {model_ref}`"
        )
    shapes = module_shapes(model, sub.modules)
    for name, (u, _, v) in sub.bases.items():
        want = [int(u.shape[0]), int(v.shape[0])]
        if shapes.get(name) != want:
            have = f"has shape {shapes[name]}" if name in shapes else "does not exist"
            raise DataError(
                f"{folder}: module '{name}' is {want} in the subspace (from {was}) but {have} in {model_ref}"
            )
    weights = meta.get("weights_fingerprint")
    if weights and weights != weights_fingerprint(model, sub.modules):
        raise DataError(
            f"{folder}: the subspace was estimated on other weights than those of {model_ref} (same "
            f"architecture, {was}): re-run `spf estimate --model {model_ref}`"
        )
