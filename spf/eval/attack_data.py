"""Harmful fine-tuning data with real harmful answers (the literature's attack, not "Sure, here is …" stubs).

The unaligned packaged model answers AdvBench's attack-role prompts (never a dev or test prompt); the judge
keeps the answers it marks harmful. What Huang et al. and Qi et al. fine-tune on is (harmful request, real
harmful answer); a one-line compliance target teaches the opening of compliance but none of its content.
"""

from __future__ import annotations

import logging
from typing import Any

from spf.data.samples import ChatSample
from spf.eval.prompts import PromptSet
from spf.generation import generate

logger = logging.getLogger(__name__)

__all__ = ["harmful_answers"]


def harmful_answers(
    model: Any,
    tokenizer: Any,
    prompts: PromptSet,
    judge: Any,
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
) -> tuple[list[ChatSample], dict[str, Any]]:
    """``(pairs the judge marks harmful, stats)`` from greedy answers to ``prompts``."""
    texts = [p.text for p in prompts.items]
    if not texts:
        raise ValueError("no prompts to answer")
    answers = generate(
        model,
        tokenizer,
        [[{"role": "user", "content": t}] for t in texts],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    verdicts = judge(texts, answers, harmful_request=[True] * len(texts))
    kept = [
        ChatSample.from_pair(t, a, source=f"{prompts.source}:{item.id or i}")
        for i, (item, t, a, v) in enumerate(zip(prompts.items, texts, answers, verdicts, strict=True))
        if v.harmful
    ]
    stats = {
        "prompts": len(texts),
        "kept": len(kept),
        "refused": sum(v.refused for v in verdicts),
        "judge": getattr(judge, "name", None),
        "max_new_tokens": max_new_tokens,
    }
    logger.info("harmful answers: kept %d of %d (judge %s)", len(kept), len(texts), stats["judge"])
    return kept, stats
