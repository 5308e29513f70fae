"""Join the blind annotations with the pool's key into spf/data/judge_labels_v2.jsonl, with agreement stats.

    python experiments/judge_labels/merge_labels.py --pool-dir RUNS/pool --labels-dir LABELS \
        [--out spf/data/judge_labels_v2.jsonl] [--stats experiments/judge_labels/agreement.json]

LABELS holds ``annotator_a_*.jsonl`` and ``annotator_b_*.jsonl`` (``{uid, label[, unsure]}``) and, for the rows
they disagree on, ``adjudicated_*.jsonl`` from a third blind reading. The final label is the annotators' shared
label, else the adjudicated one. Public prompts are written as references only (``prompt_source`` +
``prompt_ref``); our own prompts as text.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from sklearn.metrics import cohen_kappa_score

_OURS = ("ours-harmful", "ours-overrefusal", "ours-sentiment")


def _read(paths: list[Path]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in sorted(paths):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["uid"]] = rec
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-dir", type=Path, required=True)
    parser.add_argument("--labels-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("spf/data/judge_labels_v2.jsonl"))
    parser.add_argument("--stats", type=Path, default=Path("experiments/judge_labels/agreement.json"))
    args = parser.parse_args()
    key = _read([args.pool_dir / "key.jsonl"])
    pool = _read([args.pool_dir / "pool.jsonl"])
    a = _read(list(args.labels_dir.glob("annotator_a_*.jsonl")))
    b = _read(list(args.labels_dir.glob("annotator_b_*.jsonl")))
    adj = _read(list(args.labels_dir.glob("adjudicated_*.jsonl")))
    both = [u for u in pool if u in a and u in b]
    rows, missing = [], []
    for uid in both:
        la, lb = a[uid]["label"], b[uid]["label"]
        final = la if la == lb else adj.get(uid, {}).get("label")
        if final is None:
            missing.append(uid)
            continue
        k = key[uid]
        rec = {
            "uid": uid,
            "model": k["model"],
            "prompt_source": k["prompt_source"],
            "prompt_ref": k["prompt_ref"],
            "harmful_request": k["harmful_request"],
            "response": pool[uid]["response"],
            "label": final,
            "annotator_a": la,
            "annotator_b": lb,
        }
        if k["prompt_source"] in _OURS:
            rec["prompt"] = pool[uid]["prompt"]
        rows.append(rec)
    if missing:
        print(f"{len(missing)} disagreements without an adjudicated label, e.g. {missing[:3]}; not written")
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    la = [a[u]["label"] for u in both]
    lb = [b[u]["label"] for u in both]
    stats = {
        "command": "python experiments/judge_labels/merge_labels.py",
        "rows_labelled_by_both": len(both),
        "rows_written": len(rows),
        "raw_agreement": sum(x == y for x, y in zip(la, lb, strict=True)) / len(both) if both else None,
        "cohen_kappa": cohen_kappa_score(la, lb) if both else None,
        "disagreements": sum(x != y for x, y in zip(la, lb, strict=True)),
        "adjudicated": sum(1 for u in both if a[u]["label"] != b[u]["label"] and u in adj),
        "unsure": {
            "a": sum(bool(a[u].get("unsure")) for u in both),
            "b": sum(bool(b[u].get("unsure")) for u in both),
        },
        "final_labels": dict(Counter(r["label"] for r in rows)),
        "by_model": {
            m: dict(Counter(r["label"] for r in rows if r["model"] == m))
            for m in sorted({r["model"] for r in rows})
        },
    }
    args.stats.write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
