"""Greedy generation throughput of spf.refusal.generate: one prompt at a time vs batched, in one run.

Counts only real generated tokens (up to and excluding the first EOS; padding after EOS is not counted) by
recording what ``model.generate`` returns. Prints tokens/s for each batch size and the batched / one-by-one
ratio.

    python benchmarks/bench_generation.py [--n 32] [--max-new-tokens 48] [--batch-sizes 1 16 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.generate_judge_responses import BENIGN, HARMFUL  # noqa: E402
from spf.generation import eos_ids as _eos_ids  # noqa: E402
from spf.generation import generate  # noqa: E402
from spf.models import SMOLLM2, load_model  # noqa: E402


class TokenCounter:
    """Wraps ``model.generate`` to count generated tokens before each row's first EOS."""

    def __init__(self, model: Any, eos_ids: list[int]) -> None:
        self.model, self.eos = model, torch.tensor(eos_ids)
        self.inner = model.generate
        self.tokens = 0

    def __call__(self, **kwargs: Any) -> torch.Tensor:
        out = self.inner(**kwargs)
        new = out[:, kwargs["input_ids"].shape[1] :]
        is_eos = torch.isin(new, self.eos.to(new.device))
        # Tokens before the first EOS: cumulative EOS count is 0 there; padding after EOS is excluded.
        self.tokens += int((is_eos.cumsum(1) == 0).sum())
        return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=SMOLLM2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    prompts = [p for pair in zip(HARMFUL, BENIGN, strict=False) for p in pair][: args.n]
    convs = [[{"role": "user", "content": p}] for p in prompts]
    counter = TokenCounter(model, _eos_ids(model, tokenizer))
    model.generate = counter  # instance attribute shadows the method; spf.refusal.generate calls it
    generate(model, tokenizer, convs[:2], max_new_tokens=4, batch_size=2)  # warm-up (allocations, kernels)

    results, answers = {}, {}
    for bs in args.batch_sizes:
        counter.tokens = 0
        start = time.perf_counter()
        answers[bs] = generate(model, tokenizer, convs, max_new_tokens=args.max_new_tokens, batch_size=bs)
        seconds = time.perf_counter() - start
        results[bs] = {"seconds": seconds, "tokens": counter.tokens, "tokens_per_s": counter.tokens / seconds}
        print(
            f"batch_size={bs:<3} {counter.tokens:>5} tokens in {seconds:7.1f} s = {results[bs]['tokens_per_s']:7.1f} tok/s"
        )
    base = results[args.batch_sizes[0]]["tokens_per_s"]
    for bs in args.batch_sizes[1:]:
        same = sum(a == b for a, b in zip(answers[bs], answers[args.batch_sizes[0]], strict=True))
        print(
            f"batch_size={bs} / batch_size={args.batch_sizes[0]}: {results[bs]['tokens_per_s'] / base:.2f}x "
            f"tokens/s; {same}/{len(prompts)} answers identical"
        )
    print("RESULT " + json.dumps({str(k): v for k, v in results.items()}))


if __name__ == "__main__":
    main()
