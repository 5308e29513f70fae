"""Greedy batched generation for chat models: the one code path every answer in the project comes from.

Safety-sample choice (:mod:`spf.refusal`), the evaluation suites, the alignment recipe and the served model
all generate through :func:`generate`, so an answer judged in evaluation is produced exactly as one chosen
for estimation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["eos_ids", "generate", "model_device"]

logger = logging.getLogger(__name__)


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids to stop at: the model's generation config (may list several) plus the tokenizer's."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.append(gen_eos)
    elif gen_eos:
        ids.extend(int(i) for i in gen_eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _render(
    tokenizer: Any, conversations: list[list[dict[str, str]]], prefill: list[str] | None
) -> list[str]:
    # tokenize=False gives a plain string on every transformers version (tokenize=True returns a
    # BatchEncoding in 5.x); the template already contains any BOS, hence add_special_tokens=False later.
    return [
        tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        + (prefill[i] if prefill is not None else "")
        for i, conv in enumerate(conversations)
    ]


def _greedy_hf(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int | None = None,  # after a row's stop; None = its first stop id
) -> list[torch.Tensor]:
    """``model.generate``'s greedy answers (every row runs until the longest one stops)."""
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        # Neutralise sampling knobs a checkpoint's generation_config may set, so greedy is greedy and
        # transformers does not warn about unused temperature/top_p.
        temperature=None,
        top_p=None,
        top_k=None,
        use_cache=True,
        eos_token_id=stop_ids,
        pad_token_id=stop_ids[0] if pad_id is None else pad_id,
    )
    return list(out[:, input_ids.shape[1] :])


def _greedy_pruned(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: list[int],
) -> list[list[int]]:
    """Greedy decoding with a KV cache that drops each row once it has stopped.

    ``model.generate`` keeps every finished row in the batch until the longest answer ends, so a batch of
    short refusals and one 64-token answer costs 64 full-batch steps. Here a finished row leaves the batch
    (and the cache): the step cost follows the rows still generating. Same tokens as ``generate`` with
    greedy decoding, up to floating-point near-ties (the batch shape changes the matmul order)."""
    stops = torch.tensor(stop_ids, device=input_ids.device)
    mask = attention_mask
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    # logits of the last position only: the full prompt's (length × vocabulary) logits are never needed
    out = model(
        input_ids=input_ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1
    )
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        for row, tok in zip(rows.tolist(), nxt.tolist(), strict=True):
            tokens[row].append(tok)
        going = (~torch.isin(nxt, stops)).nonzero().squeeze(-1)
        if step == max_new_tokens - 1 or going.numel() == 0:
            break
        cache = out.cache
        if going.numel() < rows.numel():
            rows, nxt, mask = rows[going], nxt[going], mask[going]
            cache.batch_select_indices(going)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return tokens


def generate(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    prefill: list[str] | None = None,
    prune_finished: bool = True,
) -> list[str]:
    """Greedy answers to chat conversations, batched with left padding; one string per conversation.

    Each conversation is rendered with the tokenizer's chat template plus the generation prompt;
    ``prefill[i]`` is appended after it so answer ``i`` is forced to start with that text. Returned
    strings are only the newly generated text (no prompt, no prefill), special tokens removed, stripped.
    ``prune_finished=False`` decodes with ``model.generate`` instead (the reference the faster default is
    checked against: tests and ``benchmarks/bench_eval_speed.py``).
    """
    if prefill is not None and len(prefill) != len(conversations):
        raise ValueError(f"prefill has {len(prefill)} entries for {len(conversations)} conversations")
    if not conversations:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    texts = _render(tokenizer, conversations, prefill)
    # Batch prompts of similar length together to minimise padding; answers are put back in order.
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    device = model_device(model)
    stop_ids = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    answers: list[str] = [""] * len(texts)
    old_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"  # decoder-only models continue from the last position of each row
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="generate", disable=len(batches) <= 1, leave=False):
                enc = tokenizer(
                    [texts[i] for i in batch], add_special_tokens=False, padding=True, return_tensors="pt"
                ).to(device)
                ids, mask = enc["input_ids"], enc["attention_mask"]
                if prune_finished:
                    tokens = _greedy_pruned(model, ids, mask, max_new_tokens, stop_ids)
                else:
                    tokens = _greedy_hf(model, ids, mask, max_new_tokens, stop_ids, pad_id)
                decoded = tokenizer.batch_decode(tokens, skip_special_tokens=True)
                for i, text in zip(batch, decoded, strict=True):
                    answers[i] = text.strip()
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return answers
