"""Build the alignment data of the recommended aligned base (docs/results/headline.md, "fourth attempt").

    python experiments/align_data.py --out runs/align_data_v4
    spf align --out runs/aligned_v4 --refusals runs/align_data_v4/refusals.jsonl --n-refusals 100 \
      --benign spf/data/align_benign.jsonl runs/align_data_v4/benign_public.jsonl \
      --steps 150 --lr 5e-4 --max-new-tokens 64 --unlikelihood-weight 0.1 --threads 1   # sixth base

* refusals: our 58 written pairs + 100 keyword-judged refusals of safety_only_instructions.json
  (`spf data refusals --n 100 --seed 0`, reproduced exactly); `--n-refusals 100` then keeps a seeded 100.
* benign_public: 150 Alpaca/Dolly instructions without an input/context field (the model answers them
  itself during alignment; their reference answers are not used), seeded pick.

The v4 base in the results was built from an earlier, ad-hoc 150-prompt public pick of the same kind; this
script is the deterministic recipe going forward (same sizes and sources, not the same rows).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    shared, out = Path(a.shared_data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    public = out / "public_refusals.jsonl"
    subprocess.run(
        [sys.executable, "-m", "spf", "data", "refusals", "--src", str(shared / "safety" / "safety_only_instructions.json"),
         "--n", "100", "--seed", str(a.seed), "--out", str(public)],
        check=True,
    )  # fmt: skip
    ours = (ROOT / "spf" / "data" / "align_refusals.jsonl").read_text()
    (out / "refusals.jsonl").write_text(ours + public.read_text())
    prompts = [r["instruction"] for r in json.loads((shared / "benign" / "alpaca_subset.json").read_text())
               if not r.get("input")]  # fmt: skip
    for line in (shared / "benign" / "dolly_subset.jsonl").read_text().splitlines():
        r = json.loads(line)
        if not r.get("context"):
            prompts.append(r["instruction"])
    prompts = [p for p in dict.fromkeys(p.strip() for p in prompts) if 0 < len(p) <= 500]
    random.Random(a.seed).shuffle(prompts)
    with (out / "benign_public.jsonl").open("w") as fh:
        for p in prompts[:150]:
            fh.write(json.dumps({"prompt": p}) + "\n")
    print(f"wrote {out}/refusals.jsonl (158 pairs) and {out}/benign_public.jsonl (150 prompts)")


if __name__ == "__main__":
    main()
