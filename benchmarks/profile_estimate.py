"""Where a re-estimation's time goes, separate vs fused, on the real model (one process, interleaved reps).

    python benchmarks/profile_estimate.py [--batch-size 8] [--reps 4] [--threads 1] [--json OUT]

Per rep, at the same weights (LoRA r=8 on every decoder linear of SmolLM2-135M, B ≠ 0):
  * plain: forward + backward of the task batch (what vanilla pays); plain_full_logits: the same with the
    LM head and softmax at every position (the loss before ``row_losses``);
  * fused: the same with the safety row appended, routed and captured (spf.core.fused), then the algebra;
  * separate: plain + the separate estimate's own forward/backward (spf.core.gradients) + the algebra;
  * algebra: ``subspace_from_factors`` alone (the batched T×T eigen-problems, QR, bookkeeping).
``plain_extra_row`` is the fused pass's batch without hooks (the row's own cost; the rest of ``fused_pass`` is
routing and capture); ``--cprofile`` prints the top functions of one fused step. Ratios are of medians in this one run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from spf.core.fused import FusedEstimate
from spf.core.gradients import module_gradient_factors
from spf.core.losses import PlainBatch, per_sample_loss
from spf.core.subspace import subspace_from_factors
from spf.data.samples import collate, encode_sample, load_samples, pad_token_id
from spf.models import default_target_modules, load_model

ROOT = Path(__file__).resolve().parents[1]


def _setup(args):
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    names = default_target_modules(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=names))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # as after some training: the LoRA branch is part of every gradient
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    model.train()
    task = load_samples(args.data)[: args.batch_size]
    safety = load_samples(args.safety_sample)[:1]
    rows = [encode_sample(tok, s, max_length=256) for s in task]
    return model, tok, names, rows, safety


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(ROOT / "spf" / "data" / "sentiment.jsonl"))
    p.add_argument("--safety-sample", default=str(ROOT / "spf" / "data" / "refusals.jsonl"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model, tok, names, rows, safety = _setup(args)
    pad = pad_token_id(tok)
    fused = FusedEstimate(model, tok, safety, names, pad_token_id=pad)
    n_tokens = fused.n_tokens

    def plain():
        mb = PlainBatch(rows, pad, "cpu")
        mb.backward(mb.loss(model))
        model.zero_grad(set_to_none=True)

    def plain_full():  # the loss before row_losses: logits and softmax at every position
        batch = collate(rows, pad)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per_sample_loss(out.logits, batch["labels"]).mean().backward()
        model.zero_grad(set_to_none=True)

    def plain_extra_row():  # the fused pass's batch without its hooks: what the extra row alone costs
        mb = PlainBatch([*rows, *fused.encoded], pad, "cpu")
        mb.backward(mb.loss(model))
        model.zero_grad(set_to_none=True)

    def algebra(factors):
        subspace_from_factors(model, names, factors, safety, rank=8, n_tokens=n_tokens, estimate="fused")

    def fused_step():
        with fused.step(rows, "cpu") as fb:
            fb.backward(fb.loss(model))
        model.zero_grad(set_to_none=True)
        algebra(fused.factors())

    def fused_pass():
        with fused.step(rows, "cpu") as fb:
            fb.backward(fb.loss(model))
        model.zero_grad(set_to_none=True)
        fused.factors()

    def separate_pass():
        batch = collate([encode_sample(tok, safety[0])], pad)
        return module_gradient_factors(model, batch, names)

    def separate_step():
        plain()
        algebra(separate_pass())

    factors = separate_pass()
    cases = {
        "plain": plain,
        "plain_full_logits": plain_full,
        "plain_extra_row": plain_extra_row,
        "fused_pass": fused_pass,
        "fused_step": fused_step,
        "separate_pass": lambda: separate_pass(),
        "separate_step": separate_step,
        "algebra": lambda: algebra(factors),
    }
    for fn in cases.values():  # warm-up: one-off allocations
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.reps):
        for k, fn in cases.items():
            times[k].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"batch {args.batch_size}, {args.reps} reps, {args.threads} thread(s); medians:")
    for k, v in med.items():
        print(f"  {k:<14} {v:7.3f} s  {v / med['plain']:5.2f} × plain")
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        fused_step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    if args.json:
        doc = {"command": "python benchmarks/profile_estimate.py " + " ".join(__import__("sys").argv[1:]),
               "batch_size": args.batch_size, "reps": args.reps, "threads": args.threads,
               "median_s": med, "ratio_to_plain": {k: v / med["plain"] for k, v in med.items()}}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
