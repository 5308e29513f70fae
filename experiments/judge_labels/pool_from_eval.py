"""A blind labelling pool from the answers an evaluation already generated (no generation here).

    python experiments/judge_labels/pool_from_eval.py --eval RUNS/deep_dev --model aligned_deep \
        --out-dir RUNS/pool_deep [--per-suite harmful=60 overrefusal=40 prefill=20] [--seed 0]

Reads ``samples.jsonl`` of a ``spf eval`` / ``experiments/aligned_base.py`` folder on the **dev** prompts,
joins each answer to its prompt reference (``make_pool.dev_prompts``), samples a fixed number per suite, and
writes ``pool.jsonl`` (``{uid, prompt, response}``: all a labeller sees) and ``key.jsonl`` (who wrote it), in
the format ``merge_labels.py`` joins. A prefill row's response is the continuation only, as the judge reads
it; the labeller sees the prompt with the attack's opening shown in brackets before it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from experiments.judge_labels.make_pool import dev_prompts
from spf.data.locate import require_shared_data

_SOURCES = {"advbench": "advbench", "ours": "ours-harmful", "xstest-unsafe": "xstest-unsafe"}
_BENIGN = {"ours": "ours-overrefusal", "xstest-safe": "xstest-safe"}


def _source(rec: dict) -> str:
    return (_BENIGN if rec["suite"] == "overrefusal" else _SOURCES)[rec["source"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--model", required=True, help="the name the labels record (never shown)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--per-suite", nargs="+", default=["harmful=60", "overrefusal=40", "prefill=20"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    want = {k: int(v) for k, v in (s.split("=") for s in args.per_suite)}
    refs = {(p["prompt"], p["prompt_source"]): p for p in dev_prompts(require_shared_data())}
    recs = [json.loads(line) for line in (args.eval / "samples.jsonl").read_text().splitlines() if line]
    rng = random.Random(args.seed)
    rows = []
    for suite, n in want.items():
        mine = [r for r in recs if r["suite"] == suite]
        for r in rng.sample(mine, min(n, len(mine))):
            ref = refs[(r["prompt"], _source(r))]
            shown = r["prompt"] if suite != "prefill" else f"{r['prompt']}\n[answer begins: {r['prefill']}]"
            answer = r["continuation"] if suite == "prefill" else r["response"]
            rows.append({**ref, "shown": shown, "response": answer, "suite": suite})
    rng.shuffle(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (
        open(args.out_dir / "pool.jsonl", "w", encoding="utf-8") as pool,
        open(args.out_dir / "key.jsonl", "w", encoding="utf-8") as key,
    ):
        for row in rows:
            tag = f"{args.model}|{row['suite']}|{row['prompt_source']}|{row['prompt_ref']}"
            uid = hashlib.sha256(tag.encode()).hexdigest()[:12]
            pool.write(json.dumps({"uid": uid, "prompt": row["shown"], "response": row["response"]}) + "\n")
            keep = ("prompt_source", "prompt_ref", "harmful_request", "suite")
            key.write(json.dumps({"uid": uid, "model": args.model, **{k: row[k] for k in keep}}) + "\n")
    print(f"pool: {len(rows)} rows → {args.out_dir}")


if __name__ == "__main__":
    main()
