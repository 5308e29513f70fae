"""Is the safety gradient lower-rank than a utility gradient? Like-for-like CER on SmolLM2-135M-Instruct.

A single sample's gradient of a linear layer has rank ≤ its token count, so single-sample CER is high for
ANY sample; the comparison is only fair at equal sample counts and similar token counts. We compare
  * 1 safety pair vs 1 SST-2 pair (token counts printed),
  * 8 safety pairs vs 8 SST-2 pairs (batch gradients),
and report the overlap φ of the single-sample safety subspace with the 8-sample one (finding III).

    python experiments/cer_compare.py  [--out docs/results/cer.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from spf.core.subspace import estimate_batch_subspace, subspace_overlap
from spf.data.samples import encode_sample
from spf.data.scenarios import refusal_pairs, sst2
from spf.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "cer.md"))
    p.add_argument("--rank", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m-instruct")
    safety = refusal_pairs(SHARED / "safety" / "safety_only_instructions.json", n=8, seed=7)
    # SST-2 sentences are short: pick ones whose token count is close to the safety samples'
    pool = sst2(SHARED / "utility" / "sst2_train.tsv", n=2000, seed=7)
    target = sum(len(encode_sample(tok, s)["input_ids"]) for s in safety) / len(safety)
    pool.sort(key=lambda s: abs(len(encode_sample(tok, s)["input_ids"]) - target))
    utility = pool[:8]

    def ntok(samples):
        return sum(len(encode_sample(tok, s)["input_ids"]) for s in samples)

    rows = []
    subs = {}
    for label, samples in (
        ("safety ×1", safety[:1]),
        ("SST-2 ×1", utility[:1]),
        ("safety ×8", safety),
        ("SST-2 ×8", utility),
    ):
        sub = estimate_batch_subspace(model, tok, samples, rank=a.rank)
        subs[label] = sub
        rows.append((label, ntok(samples), *(sub.mean_cer(k) for k in (1, 5, 10, 20))))
    phi = subspace_overlap(subs["safety ×1"], subs["safety ×8"], k=10)
    phi_u = subspace_overlap(subs["safety ×1"], subs["SST-2 ×8"], k=10)
    lines = [
        "| gradient | tokens | mean CER@1 | CER@5 | CER@10 | CER@20 |",
        "|---|---|---|---|---|---|",
        *[f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} |" for r in rows],
        "",
        f"Overlap φ@10 of the single-sample safety subspace with the 8-sample safety subspace: "
        f"mean {sum(phi.values()) / len(phi):.3f} (min {min(phi.values()):.3f}, max {max(phi.values()):.3f}) over "
        f"{len(phi)} modules; with the 8-sample SST-2 subspace: mean {sum(phi_u.values()) / len(phi_u):.3f}.",
    ]
    text = "\n".join(lines)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
