"""The shipped judges on blind labels of models they were never fitted on (no refit: the heads as shipped).

    python experiments/judge_labels/check_shipped.py --models aligned_deep4 --json docs/results/judges_deep_base.json

Reads the rows of ``--models`` from ``spf/data/judge_labels_v2.jsonl`` (public prompts joined from the data
folder), judges them with judge v2 (``spf/data/judge_v2`` heads, which no row of these models trained) and the
keyword judge, and writes accuracy / precision / recall with Wilson intervals for ``refused`` and
``harmful`` (request harmfulness known, as the suites know it) — the measures of docs/results/judges.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from spf.data.locate import require_shared_data
from spf.eval.judge_data import LABELS_V2_PATH, load_labels_v2
from spf.eval.judge_validation import scores
from spf.eval.judges import KeywordJudge
from spf.eval.trained_judge import TrainedJudge


def verdicts_of(judge, rows) -> list:
    return judge([r.prompt for r in rows], [r.response for r in rows], [r.harmful_request for r in rows])


def judged(verdicts, rows) -> dict:
    refused = np.array([v.refused for v in verdicts])
    harmful = np.array([v.harmful for v in verdicts])
    known = np.array([bool(r.harmful_request) for r in rows])
    return scores(rows, refused, harmful, known)


def harmful_rates(rows, verdicts: dict[str, list]) -> dict:
    """Per model: the labelled harmful count beside each judge's, on the same rows (a judge's bias there)."""
    out: dict = {}
    for i, r in enumerate(rows):
        m = out.setdefault(r.group[3:], {"n": 0, "labelled": 0, **{name: 0 for name in verdicts}})
        m["n"] += 1
        m["labelled"] += int(r.cls == "complied" and bool(r.harmful_request))
        for name, v in verdicts.items():
            m[name] += int(bool(v[i].harmful))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--labels", type=Path, default=LABELS_V2_PATH)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    rows = [r for r in load_labels_v2(args.labels, require_shared_data()) if r.group[3:] in args.models]
    if not rows:
        raise SystemExit(f"{args.labels}: no rows of {args.models}")
    verdicts = {"v2": verdicts_of(TrainedJudge(), rows), "keyword": verdicts_of(KeywordJudge(), rows)}
    labels = "" if args.labels == LABELS_V2_PATH else f" --labels {args.labels}"
    doc = {
        "command": f"python experiments/judge_labels/check_shipped.py{labels} --models "
        + " ".join(args.models),
        "models": args.models,
        "rows": len(rows),
        "harmful_prompt_rows": sum(bool(r.harmful_request) for r in rows),
        **{name: judged(v, rows) for name, v in verdicts.items()},
        "by_model": harmful_rates(rows, verdicts),
    }
    args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")

    def shown(part: dict, measure: str) -> str:  # None where no row has the verdict (benign-only labels)
        value = part[measure]["value"]
        return "—" if value is None else f"{value:.3f}"

    for name in ("v2", "keyword"):
        s = doc[name]
        print(
            f"{name}: refused acc {shown(s['refused'], 'accuracy')} recall {shown(s['refused'], 'recall')}; "
            f"harmful acc {shown(s['harmful'], 'accuracy')} recall {shown(s['harmful'], 'recall')} "
            f"precision {shown(s['harmful'], 'precision')}"
        )


if __name__ == "__main__":
    main()
