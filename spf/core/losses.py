"""Token cross-entropy on response tokens: the training loss and the safety (refusal) loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from spf.data.samples import IGNORE_INDEX, ChatSample, chat_prompt_ids, collate, encode_sample, pad_token_id

__all__ = [
    "PlainBatch",
    "batch_loss",
    "encode_prefix_batch",
    "kept_position_loss",
    "per_sample_loss",
    "prefix_unlikelihood_loss",
    "response_loss",
    "row_losses",
]


def per_sample_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over each row's supervised tokens (labels ≠ -100) → shape [B]."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).float()
    return (tok * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def kept_position_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row mean cross-entropy where ``logits[:, j]`` predicts ``targets[:, j]`` (-100 = ignore) → [B]."""
    tok = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    mask = (targets != IGNORE_INDEX).float()
    return (tok * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class PlainBatch:
    """One micro-batch of plain training: the loop calls ``loss(model)`` then ``backward(loss)`` (the shape
    :class:`spf.core.fused.FusedBatch` shares, so a training loop runs either)."""

    def __init__(self, rows: Sequence[dict[str, list[int]]], pad: int, device: torch.device | str) -> None:
        self.batch = {k: v.to(device) for k, v in collate(list(rows), pad).items()}

    def loss(self, model: torch.nn.Module) -> Tensor:
        return batch_loss(model, self.batch)

    def backward(self, loss: Tensor) -> None:
        loss.backward()


def row_losses(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Each row's mean response-token cross-entropy → [B], the LM head run only where a response token is
    predicted (``logits_to_keep``: the positions any row supervises). On short answers after long prompts
    (a label after an instruction) the LM head and the softmax over the vocabulary at every prompt position
    are a quarter of a step's compute for nothing; the loss is the same as :func:`per_sample_loss`'s."""
    labels = batch["labels"]
    positions = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    if positions.numel() == 0:
        raise ValueError("no supervised (response) token in the batch")
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=positions
    )
    return kept_position_loss(out.logits, labels[:, positions + 1])


def batch_loss(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean over samples of each sample's mean token loss, so long answers do not dominate."""
    return row_losses(model, batch).mean()


@torch.no_grad()
def response_loss(
    model: torch.nn.Module,
    tokenizer,
    samples: Sequence[ChatSample],
    *,
    batch_size: int = 8,
    max_length: int = 512,
) -> list[float]:
    """Per-sample mean cross-entropy of each response; on (harmful prompt, refusal) pairs it is the safety loss."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    losses: list[float] = []
    try:
        for i in range(0, len(samples), batch_size):
            enc = [encode_sample(tokenizer, s, max_length=max_length) for s in samples[i : i + batch_size]]
            batch = {k: v.to(device) for k, v in collate(enc, pad).items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            losses.extend(per_sample_loss(out.logits, batch["labels"]).tolist())
    finally:
        model.train(was_training)
    return losses


def encode_prefix_batch(
    tokenizer, prompts: Sequence[ChatSample], prefixes: Sequence[str], *, max_length: int = 256
) -> dict[str, Tensor]:
    """Every (prompt, prefix) pair as generation prompt + prefix tokens, only the prefix supervised.

    No end-of-turn token follows the prefix: what is scored is how likely the answer is to *start* so.
    """
    encoded = []
    prefix_ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prefixes]
    for sample in prompts:
        ids = chat_prompt_ids(tokenizer, sample)
        for pre in prefix_ids:
            keep = max(1, max_length - len(pre))
            head = ids[-keep:]
            encoded.append(
                {
                    "input_ids": head + pre,
                    "labels": [IGNORE_INDEX] * len(head) + pre,
                    "attention_mask": [1] * (len(head) + len(pre)),
                }
            )
    return collate(encoded, pad_token_id(tokenizer))


def prefix_unlikelihood_loss(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean over rows of -log(1 - p(prefix | prompt)): pushes a whole answer opening (e.g. a refusal) down.

    Sequence-level unlikelihood (Welleck et al., 2019, applied to a phrase rather than a token): it is large
    only while the model would actually start its answer with the prefix, and vanishes as p → 0, so it does
    not keep pushing once the opening is unlikely.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    seq_logp = (logp * mask).sum(1).clamp(max=-1e-6)  # log p(prefix) < 0 so that 1 - p > 0
    return -torch.log(-torch.expm1(seq_logp)).mean()
