"""Near-duplicates between alignment prompts and every evaluation prompt (AdvBench, XSTest, our held-out sets).

    python experiments/align_data/check_overlap.py FILE... [--shared ../shared/data] [--cosine 0.85] [--ratio 0.75]

Prints each alignment prompt whose MiniLM cosine to an evaluation prompt is ≥ --cosine or whose difflib
ratio is ≥ --ratio, and writes FILE.clean.jsonl without them (the shipped files are built from those).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def eval_prompts(shared: Path) -> list[str]:
    out = [r["Behavior"] for r in csv.DictReader((shared / "safety" / "advbench_behaviors.csv").open())]
    out += [r["prompt"] for r in csv.DictReader((shared / "xstest" / "xstest_prompts.csv").open())]
    for name in ("heldout_harmful.jsonl", "overrefusal_prompts.jsonl", "refusals.jsonl"):
        out += [
            json.loads(line)["prompt"] for line in (ROOT / "spf" / "data" / name).read_text().splitlines()
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cosine", type=float, default=0.85)
    ap.add_argument("--ratio", type=float, default=0.75)
    a = ap.parse_args()
    from spf.eval.judges import MiniLMEmbedder

    evals = eval_prompts(a.shared)
    emb = MiniLMEmbedder()
    ev = np.asarray(emb.encode(evals))
    low = [e.lower().strip() for e in evals]
    for path in a.files:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        x = np.asarray(emb.encode([r["prompt"] for r in rows]))
        sims = x @ ev.T
        kept, dropped = [], 0
        for i, r in enumerate(rows):
            j = int(sims[i].argmax())
            close = difflib.get_close_matches(r["prompt"].lower().strip(), low, n=1, cutoff=a.ratio)
            if sims[i, j] >= a.cosine or close:
                dropped += 1
                print(f"{path.name}: drop {r['prompt']!r} ~ {evals[j]!r} (cos {sims[i, j]:.2f})")
            else:
                kept.append(r)
        out = path.with_suffix(".clean.jsonl")
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        print(f"{path}: kept {len(kept)}, dropped {dropped} → {out}")


if __name__ == "__main__":
    main()
