"""Answers of several models on dev prompts, shuffled into a blind labelling pool.

    python experiments/judge_labels/make_pool.py --runs RUNS --out-dir experiments/judge_labels \
        [--per-model 70] [--max-new-tokens 64]

Prompts: dev roles only (spf/data/prompt_splits.json): AdvBench dev, XSTest dev (safe and unsafe), our
held-out harmful dev split, our over-refusal dev rows, and SST-2-format sentences (sentiment_dev.jsonl).
Each model answers its own random subset, so the pool mixes prompts and models. Writes

* ``pool.jsonl`` — ``{uid, prompt, response}`` in a random order: all a labeller sees;
* ``key.jsonl`` — ``{uid, model, prompt_source, prompt_ref}``: who wrote each answer (not shown to labellers).

Public prompt texts stay out of the repository: ``pool.jsonl`` is written to ``--out-dir`` and the shipped
label file (``spf/data/judge_labels_v2.jsonl``) keeps only row references for public prompts.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
from pathlib import Path

import torch

from spf.data.locate import PACKAGE_DATA, require_shared_data
from spf.data.splits import load_splits, role_ids
from spf.generation import generate
from spf.models import load_finetuned, load_model


def dev_prompts(root: Path) -> list[dict]:
    """``{prompt, prompt_source, prompt_ref, harmful_request}`` for every dev prompt."""
    return role_prompts(root, "dev")


def role_prompts(root: Path, role: str) -> list[dict]:
    """Every prompt of one role (``dev`` or ``test``); SST-2-format sentences only for ``dev`` (the bench
    scores utility rows, it does not generate answers to them)."""
    out = []
    with open(root / "safety/advbench_behaviors.csv", encoding="utf-8", newline="") as fh:
        dev = role_ids("advbench", role)
        for row in csv.DictReader(fh):
            if row["BehaviorID"] in dev:
                out.append(_p(row["Behavior"], "advbench", row["BehaviorID"], True))
    with open(root / "xstest/xstest_prompts.csv", encoding="utf-8", newline="") as fh:
        safe, unsafe = role_ids("xstest-safe", role), role_ids("xstest-unsafe", role)
        for row in csv.DictReader(fh):
            if row["id"] in safe | unsafe:
                out.append(_p(row["prompt"], f"xstest-{row['label']}", row["id"], row["id"] in unsafe))
    for i, line in enumerate((PACKAGE_DATA / "heldout_harmful.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        if rec["split"] == role:
            out.append(_p(rec["prompt"], "ours-harmful", str(i), True))
    over = (PACKAGE_DATA / "overrefusal_prompts.jsonl").read_text().splitlines()
    for i in load_splits()["ours"]["overrefusal_prompts"][role]:
        out.append(_p(json.loads(over[i])["prompt"], "ours-overrefusal", str(i), False))
    for i, line in enumerate(
        (PACKAGE_DATA / "sentiment_dev.jsonl").read_text().splitlines()[:30] * (role == "dev")
    ):
        out.append(_p(json.loads(line)["prompt"], "ours-sentiment", str(i), False))
    return out


def _p(text: str, source: str, ref: str, harmful: bool) -> dict:
    return {"prompt": text, "prompt_source": source, "prompt_ref": ref, "harmful_request": harmful}


def load(spec: str):
    base, _, adapter = spec.partition("+")
    if adapter:
        return load_finetuned(base, adapter)
    return load_model(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--per-model", type=int, default=70)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", default=None, help="generate only these models' answers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = dev_prompts(require_shared_data())
    runs = args.runs
    models = {
        "unaligned": "smollm2-135m-instruct",
        "aligned": str(runs / "aligned"),
        "vanilla_mix": f"{runs / 'aligned'}+{runs / 'vanilla_mix'}",
        "spf_mix": f"{runs / 'aligned'}+{runs / 'spf_mix'}",
        "lisa_mix": f"{runs / 'aligned'}+{runs / 'lisa_mix'}",
        "vanilla_sst2": f"{runs / 'aligned'}+{runs / 'vanilla_sst2'}",
    }
    rng = random.Random(args.seed)
    rows = []
    answers_dir = args.out_dir / "answers"
    answers_dir.mkdir(parents=True, exist_ok=True)
    for name, spec in models.items():
        done = answers_dir / f"{name}.jsonl"
        picked = rng.sample(prompts, min(args.per_model, len(prompts)))
        if args.only is not None and name not in args.only:
            if done.is_file():
                rows += [{**json.loads(line), "model": name} for line in done.read_text().splitlines()]
            continue
        if not done.is_file():  # resumable: one file per model
            model, tokenizer = load(spec)
            convs = [[{"role": "user", "content": p["prompt"]}] for p in picked]
            answers = generate(model, tokenizer, convs, max_new_tokens=args.max_new_tokens, batch_size=16)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(
                "".join(json.dumps({**p, "response": a}) + "\n" for p, a in zip(picked, answers, strict=True))
            )
            tmp.replace(done)
            print(f"{name}: {len(answers)} answers", flush=True)
        rows += [{**json.loads(line), "model": name} for line in done.read_text().splitlines()]
    rng.shuffle(rows)
    with (
        open(args.out_dir / "pool.jsonl", "w", encoding="utf-8") as pool,
        open(args.out_dir / "key.jsonl", "w", encoding="utf-8") as key,
    ):
        for row in rows:
            # a stable id that does not reveal the model: labels made on an earlier pool still join
            uid = hashlib.sha256(
                f"{row['model']}|{row['prompt_source']}|{row['prompt_ref']}".encode()
            ).hexdigest()[:12]
            pool.write(json.dumps({"uid": uid, "prompt": row["prompt"], "response": row["response"]}) + "\n")
            keep = ("model", "prompt_source", "prompt_ref", "harmful_request")
            key.write(json.dumps({"uid": uid, **{k: row[k] for k in keep}}) + "\n")
    print(f"pool: {len(rows)} rows")


if __name__ == "__main__":
    main()
