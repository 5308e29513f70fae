"""A blind labelling pool from the answers an evaluation already generated (no generation here).

    python experiments/judge_labels/pool_from_eval.py --eval aligned_deep=RUNS/deep_dev \
        --out-dir RUNS/pool_deep [--per-suite harmful=60 overrefusal=40 prefill=20] [--seed 0] [--split dev]

Each ``--eval MODEL=FOLDER`` names an evaluation folder and the model name its labels record (never shown to
a labeller); several pool into one shuffled file. A folder is a ``spf eval`` / ``experiments/aligned_base.py``
output (one ``samples.jsonl``) or a bench evaluation (one ``<suite>/samples.jsonl`` per suite). ``--split``
says which prompts it answered: ``dev`` for labels a judge may be fitted on, ``test`` for the bench's own
answers — labels that only ever *check* a judge (never fit one: that would tune it on reported numbers).
Each answer is joined to its prompt reference (``make_pool.role_prompts``), a fixed number per suite and
folder is sampled, and
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

from experiments.judge_labels.make_pool import role_prompts
from spf.data.locate import require_shared_data

_SOURCES = {"advbench": "advbench", "ours": "ours-harmful", "xstest-unsafe": "xstest-unsafe"}
_BENIGN = {"ours": "ours-overrefusal", "xstest-safe": "xstest-safe"}


def _source(rec: dict) -> str:
    return (_BENIGN if rec["suite"] == "overrefusal" else _SOURCES)[rec["source"]]


def _records(folder: Path) -> list[dict]:
    files = (
        [folder / "samples.jsonl"]
        if (folder / "samples.jsonl").is_file()
        else sorted(folder.glob("*/samples.jsonl"))
    )
    if not files:
        raise SystemExit(f"{folder}: no samples.jsonl (nor <suite>/samples.jsonl)")
    return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", nargs="+", required=True, metavar="MODEL=FOLDER")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--per-suite", nargs="+", default=["harmful=60", "overrefusal=40", "prefill=20"])
    parser.add_argument("--split", choices=("dev", "test"), default="dev")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    want = {k: int(v) for k, v in (s.split("=") for s in args.per_suite)}
    refs = {(p["prompt"], p["prompt_source"]): p for p in role_prompts(require_shared_data(), args.split)}
    rng = random.Random(args.seed)
    rows = []
    for spec in args.eval:
        model, _, folder = spec.partition("=")
        recs = _records(Path(folder))
        for suite, n in want.items():
            mine = [r for r in recs if r["suite"] == suite]
            for r in rng.sample(mine, min(n, len(mine))):
                ref = refs[(r["prompt"], _source(r))]
                shown = (
                    r["prompt"] if suite != "prefill" else f"{r['prompt']}\n[answer begins: {r['prefill']}]"
                )
                answer = r["continuation"] if suite == "prefill" else r["response"]
                rows.append({**ref, "shown": shown, "response": answer, "suite": suite, "model": model})
    rng.shuffle(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (
        open(args.out_dir / "pool.jsonl", "w", encoding="utf-8") as pool,
        open(args.out_dir / "key.jsonl", "w", encoding="utf-8") as key,
    ):
        for row in rows:
            tag = f"{row['model']}|{row['suite']}|{row['prompt_source']}|{row['prompt_ref']}"
            uid = hashlib.sha256(tag.encode()).hexdigest()[:12]
            pool.write(json.dumps({"uid": uid, "prompt": row["shown"], "response": row["response"]}) + "\n")
            keep = ("prompt_source", "prompt_ref", "harmful_request", "suite")
            key.write(json.dumps({"uid": uid, "model": row["model"], **{k: row[k] for k in keep}}) + "\n")
    print(f"pool: {len(rows)} rows → {args.out_dir}")


if __name__ == "__main__":
    main()
