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


def generate(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    prefill: list[str] | None = None,
) -> list[str]:
    """Greedy answers to chat conversations, batched with left padding; one string per conversation.

    Each conversation is rendered with the tokenizer's chat template plus the generation prompt;
    ``prefill[i]`` is appended after it so answer ``i`` is forced to start with that text. Returned
    strings are only the newly generated text (no prompt, no prefill), special tokens removed, stripped.
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
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    # Neutralise sampling knobs a checkpoint's generation_config may set, so greedy is greedy
                    # and transformers does not warn about unused temperature/top_p.
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    use_cache=True,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                )
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for i, text in zip(batch, decoded, strict=True):
                    answers[i] = text.strip()
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return answers
