"""Same seed, same numbers? Compare the cell.json files of two runs of one benchmark config.

spf bench run docs/results/refactor_check/bench.yaml     # once on the old code (work: …/work_before)
# edit `work:` to …/work_after, run again on the new code, then:
python experiments/refactor_check.py WORK_BEFORE WORK_AFTER --json docs/results/refactor_check/result.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("safety_loss_sample_end", "safety_loss_heldout_end", "task_loss_end", "final_loss")


def _numbers(cell: dict) -> dict:
    rates = {k: v["rate"] for k, v in cell.get("suites", {}).items() if isinstance(v, dict) and "rate" in v}
    train = {k: cell.get("train", {}).get(k) for k in KEYS if k in cell.get("train", {})}
    return {"rates": rates, "train": train}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = {}
    for cell_file in sorted((args.before / "cells").glob("*/cell.json")):
        name = cell_file.parent.name
        a = _numbers(json.loads(cell_file.read_text()))
        b = _numbers(json.loads((args.after / "cells" / name / "cell.json").read_text()))
        rel = {
            k: abs(a["train"][k] - b["train"][k]) / max(abs(a["train"][k]), 1e-12)
            for k in a["train"]
            if b["train"].get(k) is not None
        }
        out[name] = {
            "before": a,
            "after": b,
            "rates_equal": a["rates"] == b["rates"],
            "max_rel_loss_diff": max(rel.values(), default=0.0),
        }
        print(
            f"{name}: rates equal {out[name]['rates_equal']}, max relative loss difference {out[name]['max_rel_loss_diff']:.1e}"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
