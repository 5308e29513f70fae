"""Evaluation generation speed: finished rows dropped from the batch vs ``model.generate``, side by side.

    python benchmarks/bench_eval_speed.py [--model smollm2-135m-instruct] [--n 192] [--batch-size 64] \
        [--max-new-tokens 64] [--threads 2] [--json docs/results/eval_speed.json]

The prompts are the shipped evaluation files (held-out harmful, over-refusal, sentiment; no download), mixed
so a batch holds long compliant answers and short refusals as an evaluation does. Both decoders run on the
same prompts in one process, alternating which goes first per round; the report gives seconds, the ratio,
how many answers agree, and the time 600 prompts would take (issue 15's target: ≤ 240 s).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from spf.data.locate import PACKAGE_DATA
from spf.generation import generate
from spf.models import load_model


def prompts(n: int) -> list[str]:
    files = ("heldout_harmful.jsonl", "overrefusal_prompts.jsonl", "sentiment_dev.jsonl")
    pools = [[json.loads(x)["prompt"] for x in (PACKAGE_DATA / f).read_text().splitlines()] for f in files]
    out, i = [], 0
    while len(out) < n:
        pool = pools[i % len(pools)]
        out.append(pool[(i // len(pools)) % len(pool)])
        i += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    convs = [[{"role": "user", "content": p}] for p in prompts(args.n)]
    seconds = {"pruned": 0.0, "generate": 0.0}
    answers: dict[str, list[str]] = {}
    for r in range(args.rounds):
        for name in ("pruned", "generate") if r % 2 == 0 else ("generate", "pruned"):
            t0 = time.perf_counter()
            answers[name] = generate(
                model, tok, convs, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                prune_finished=name == "pruned",
            )  # fmt: skip
            seconds[name] += time.perf_counter() - t0
    same = sum(a == b for a, b in zip(answers["pruned"], answers["generate"], strict=True))
    doc = {
        "command": "python benchmarks/bench_eval_speed.py "
        f"--model {args.model} --n {args.n} --batch-size {args.batch_size} "
        f"--max-new-tokens {args.max_new_tokens} --threads {args.threads} --rounds {args.rounds}",
        "prompts": args.n,
        "seconds": {k: v / args.rounds for k, v in seconds.items()},
        "speedup": seconds["generate"] / seconds["pruned"],
        "answers_identical": same,
        "seconds_per_600_prompts": {k: v / args.rounds / args.n * 600 for k, v in seconds.items()},
        "mean_answer_words": sum(len(a.split()) for a in answers["pruned"]) / args.n,
    }
    print(json.dumps(doc, indent=1))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
