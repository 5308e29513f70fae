"""Why the margin subspace protected on the benchmark but not in the pipeline: what it is made of.

The margin gradient is ∇CE(refusal) − ∇CE(compliant opening). When the aligned model refuses confidently,
the refusal's loss (and gradient) is tiny and the compliant opening's is large, so the margin's top-k
directions are the compliance gradient's, not the refusal's — and a benign fine-tune erodes the refusal's.
Prints, for one aligned base and one sample: ‖G‖² of each side summed over modules, and the mean subspace
overlap φ of the refusal-CE subspace with the margin and the compliance-CE subspaces; then the cost of one
margin re-estimation with and without merging the pair's shared prompt rows (docs/method.md).

    python experiments/margin_vs_ce.py --model outputs/aligned --sample outputs/subspace/sample.jsonl
    python experiments/margin_vs_ce.py --model runs/aligned_v4 --sample runs/bench/cpu/subspaces/c155167e4174/sample.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from spf.core.subspace import (
    COMPLIANT_OPENING,
    _topk_svds,
    estimate_from_samples,
    margin_pair,
    module_gradient_factors,
    subspace_overlap,
)
from spf.data.samples import collate, encode_sample, load_samples, pad_token_id
from spf.models import default_target_modules, load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="aligned base (folder or packaged model)")
    p.add_argument(
        "--sample", required=True, help="JSONL whose first row is the (harmful prompt, refusal) pair"
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=default_target_modules(model)))  # as trained
    refusal = load_samples(args.sample)[0]
    comply = refusal.with_response(COMPLIANT_OPENING)
    ce, _ = estimate_from_samples(model, tok, [refusal], rank=args.rank, loss="ce")
    margin, _ = estimate_from_samples(model, tok, [refusal], rank=args.rank, loss="margin")
    comp, _ = estimate_from_samples(model, tok, [comply], rank=args.rank, loss="ce")
    e_ref, e_comp = sum(ce.energy.values()), sum(comp.energy.values())
    print(
        f"model {args.model}; refusal CE {ce.metadata['safety_loss']:.3f}, compliance CE {comp.metadata['safety_loss']:.3f}"
    )
    print(
        f"‖G‖² summed over modules: refusal {e_ref:.3g}, compliance {e_comp:.3g} (ratio {e_comp / e_ref:.1f})"
    )
    for name, other in (("margin", margin), ("compliance CE", comp)):
        phi = statistics.mean(subspace_overlap(ce, other).values())
        print(f"mean overlap φ@{args.rank} of the refusal-CE subspace with the {name} subspace: {phi:.3f}")

    pair, weights = margin_pair(refusal)
    batch = collate([encode_sample(tok, s) for s in pair], pad_token_id(tok))
    names = default_target_modules(model)
    for merge in (False, True, False, True):  # interleaved; the second of each pair is reported warm
        t0 = time.perf_counter()
        ds, xs, _ = module_gradient_factors(model, batch, names, weights=weights, merge_prefixes=merge)
        t1 = time.perf_counter()
        _topk_svds(ds, xs, args.rank, 64, "auto")
        t2 = time.perf_counter()
        print(
            f"merge_prefixes={merge}: {ds[0].shape[0]} rows, forward/backward {t1 - t0:.2f} s, factorisation {t2 - t1:.2f} s"
        )


if __name__ == "__main__":
    main()
