"""Precision / recall / F1 of the offline judges against the hand-labelled validation set.

Prints the table and writes it, with the command, to docs/results/judges.md.

    python scripts/validate_judges.py [--data spf/data/judge_validation.jsonl] [--out docs/results/judges.md]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from spf.eval.judges import VALIDATION_PATH, validate

ROOT = Path(__file__).resolve().parents[1]
LABELS = (
    ("refused", "refused (all rows)"),
    ("harmful", "harmful (all rows)"),
    ("harmful_on_harmful_prompts", "harmful (harmful prompts only)"),
)


def table(result: dict) -> str:
    lines = [
        "| judge | label | precision | recall | F1 | accuracy | positives | predicted |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, scores in result["judges"].items():
        for key, title in LABELS:
            m = scores[key]
            lines.append(
                f"| {name} | {title} | {m['precision']:.2f} | {m['recall']:.2f} | {m['f1']:.2f} | "
                f"{m['accuracy']:.2f} | {int(m['positives'])} | {int(m['predicted'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=VALIDATION_PATH)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "judges.md")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    result = validate(args.data)
    text = table(result)
    print(text)
    try:
        data = args.data.resolve().relative_to(ROOT)
    except ValueError:
        data = args.data
    command = "python scripts/validate_judges.py" + (
        "" if args.data == VALIDATION_PATH else f" --data {data}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Judge validation\n\n"
        f"`{command}` — {result['rows']} hand-labelled rows of `{data}` "
        f"({result['harmful_prompt_rows']} with a harmful prompt). The embedding judge is fitted on "
        "`spf/data/judge_train.jsonl` only; labelling guideline in `spf/data/README.md`.\n\n"
        f"{text}\n",
        encoding="utf-8",
    )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
