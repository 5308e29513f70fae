"""Write spf/data/prompt_splits.json: the pinned attack / dev / test roles of the public prompts.

    python scripts/make_prompt_splits.py [--data ../shared/data]

Only row references are written (AdvBench BehaviorIDs, XSTest ids, row numbers of our own files).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from spf.data.locate import PACKAGE_DATA, require_shared_data
from spf.data.splits import SPLITS_PATH, make_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="public data folder (default: ../shared/data)")
    parser.add_argument("--out", type=Path, default=SPLITS_PATH)
    args = parser.parse_args()
    root = require_shared_data(args.data)
    with open(root / "safety/advbench_behaviors.csv", encoding="utf-8", newline="") as fh:
        advbench = [row["BehaviorID"] for row in csv.DictReader(fh)]
    with open(root / "xstest/xstest_prompts.csv", encoding="utf-8", newline="") as fh:
        xstest = [(row["id"], row["type"], row["label"]) for row in csv.DictReader(fh)]
    lines = (PACKAGE_DATA / "overrefusal_prompts.jsonl").read_text(encoding="utf-8").splitlines()
    ours = {"overrefusal_prompts": sum(1 for line in lines if line.strip())}
    doc = make_splits(advbench, xstest, ours)
    args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
