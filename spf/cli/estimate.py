"""``spf estimate``: the safety subspace from one (harmful prompt, refusal) sample, published to a folder.

The pipeline form (``spf estimate --params params.yaml``) is the estimate stage; see :mod:`spf.cli.stages`.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

from spf.cli.args import count, non_negative_int, positive_int
from spf.cli.errors import UsageError

__all__ = ["add_arguments", "run", "summarise_cer"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--model", help="smollm2-135m-instruct | local folder | hub id | tiny-llama")
    p.add_argument("--sample", help="file of candidate samples (JSON/JSONL/CSV/TSV)")
    p.add_argument(
        "--index",
        type=non_negative_int,
        default=None,
        help="record to use (default: first the model refuses)",
    )
    p.add_argument("--rank", type=positive_int, help="k, singular directions kept per module")
    p.add_argument("--out", help="output folder")
    p.add_argument(
        "--own-response",
        action="store_true",
        help="ignore a response in the file and use the model's own answer (it must be a refusal)",
    )
    p.add_argument(
        "--batch", type=positive_int, default=1, help="estimate from the first N refused samples (comparison)"
    )
    p.add_argument(
        "--loss",
        choices=["ce", "margin"],
        default="ce",
        help="ce: the refusal's cross-entropy (the paper); margin: CE(refusal) − CE(compliant opening)",
    )
    p.add_argument("--modules", nargs="*", default=None, help="module names (default: all decoder linears)")
    p.add_argument("--max-length", type=count(2), default=512)
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="for generating the model's own answer"
    )


def summarise_cer(sub: Any, ks: tuple[int, ...] = (1, 5, 10, 20)) -> str:
    """Mean CER@k per module kind (q_proj, …): the full per-module table (210 rows on SmolLM2) is cer.json."""
    kinds: dict[str, list[str]] = defaultdict(list)
    for name in sub.modules:
        kinds[name.rsplit(".", 1)[-1]].append(name)
    cers = {k: sub.cer(k) for k in ks}
    lines = [f"{'module kind':<14}{'n':>4}  " + "  ".join(f"CER@{k:<3}" for k in ks)]
    for kind, names in kinds.items():
        vals = [sum(cers[k][n] for n in names) / len(names) for k in ks]
        lines.append(f"{kind:<14}{len(names):>4}  " + "  ".join(f"{v:7.3f}" for v in vals))
    lines.append(f"{'all':<14}{len(sub.modules):>4}  " + "  ".join(f"{sub.mean_cer(k):7.3f}" for k in ks))
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> None:
    """Every flag is checked before the model is loaded (minutes on a real model)."""
    missing = [f"--{k}" for k in ("model", "sample", "rank", "out") if getattr(args, k) is None]
    if missing:
        raise UsageError(f"{', '.join(missing)} required (or run the pipeline stage with --params FILE)")
    for flag in ("rank", "batch", "max_length", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    import torch

    from spf.data.samples import load_samples
    from spf.estimate import estimate_to_folder
    from spf.io import check_output
    from spf.models import load_model

    inputs = {"--model": args.model, "--sample": args.sample}
    check_output(args.out, inputs=inputs)  # before the model load: a refused --out costs nothing
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = load_samples(args.sample)
    if args.index is not None and not 0 <= args.index < len(candidates):
        raise UsageError(f"--index {args.index}: out of range, {args.sample} has {len(candidates)} record(s)")
    # written refusals are used as they are unless --own-response, or when the chosen record(s) lack one
    chosen = [candidates[args.index]] if args.index is not None else candidates[: args.batch]
    lacking = any(c.response is None for c in chosen)
    model, tok = load_model(args.model, device=args.device)
    sub, used, _ = estimate_to_folder(
        model,
        tok,
        candidates,
        out=args.out,
        rank=args.rank,
        n=args.batch,
        own_response=args.own_response or lacking,
        index=args.index,
        loss=args.loss,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        modules=args.modules,
        model_ref=args.model,
        inputs=inputs,
    )
    # with loss="margin" `used` holds a (refusal, compliant opening) pair per selected sample
    n_selected = len(used) // 2 if args.loss == "margin" else len(used)
    # CLI output, not logging: the sample and the CER table are the command's result
    print(
        f"sample: {used[0].prompt[:100]!r} → {(used[0].response or '')[:100]!r}"
        + (f" (+{n_selected - 1})" if n_selected > 1 else "")
    )
    print(
        f"safety loss {sub.metadata['safety_loss']:.4f} over {sub.metadata['n_tokens']} tokens; rank {sub.rank}"
    )
    print(summarise_cer(sub))
    print(f"wrote {args.out}/subspace.safetensors, subspace.json, sample.jsonl, cer.json")
    return 0
