"""Verdicts of the judge v2 heads of *this checkout* (and the keyword judge) on an evaluation's answers.

    python experiments/judge_labels/judge_answers.py runs/or_check/samples.jsonl --json OUT.json
    python experiments/judge_labels/judge_answers.py --score OUT.json --labels LABELS.jsonl   # against labels

Run it from another checkout (``git worktree add /tmp/old <commit>``; ``cd /tmp/old``; ``PYTHONPATH=.``) to
judge the same answers with older heads: what separates a judge's shift from a model's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spf.eval.judges import KeywordJudge
from spf.eval.trained_judge import TrainedJudge


def score(verdicts: Path, labels: Path) -> None:
    """Add the refused verdicts' accuracy / precision / recall (Wilson 95 %) against blind labels of the same
    answers (joined on prompt and answer text) to the verdicts file."""
    import numpy as np

    from spf.data.locate import require_shared_data
    from spf.eval.judge_data import load_labels_v2
    from spf.eval.judge_validation import scores

    doc = json.loads(verdicts.read_text(encoding="utf-8"))
    by_text = {(r["prompt"], r["response"]): r for r in doc["rows"]}
    rows = load_labels_v2(labels, require_shared_data())
    mine = [by_text[(r.prompt, r.response)] for r in rows]
    none = np.zeros(len(rows), dtype=bool)
    for name, key in (("v2", "refused"), ("keyword", "keyword_refused")):
        doc.setdefault("scores", {})[name] = scores(rows, np.array([m[key] for m in mine]), none, none)[
            "refused"
        ]
        print(name, {k: round(v["value"], 3) for k, v in doc["scores"][name].items()})
    doc["labels"] = str(labels)
    verdicts.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path, nargs="?", help="an evaluation's samples.jsonl")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--score", type=Path, help="a verdicts file this script wrote, to score")
    parser.add_argument("--labels", type=Path, help="with --score: blind labels of the same answers")
    args = parser.parse_args()
    if args.score:
        score(args.score, args.labels)
        return
    recs = [
        json.loads(line) for line in args.samples.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    prompts, answers = [r["prompt"] for r in recs], [r["response"] for r in recs]
    harmful = [r["suite"] != "overrefusal" for r in recs]
    judge = TrainedJudge()
    v2, keyword = judge(prompts, answers, harmful), KeywordJudge()(prompts, answers, harmful)
    rows = [
        {
            "prompt": r["prompt"],
            "response": r["response"],
            "source": r["source"],
            "refused": a.refused,
            "keyword_refused": b.refused,
        }
        for r, a, b in zip(recs, v2, keyword, strict=True)
    ]
    identity = getattr(judge, "identity", None)  # older checkouts did not record one
    doc = {"samples": str(args.samples), "judge_id": identity, "n": len(rows), "rows": rows}
    args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"{args.json}: v2 refused {sum(r['refused'] for r in rows)}/{len(rows)}, keyword "
          f"{sum(r['keyword_refused'] for r in rows)}")  # fmt: skip


if __name__ == "__main__":
    main()
