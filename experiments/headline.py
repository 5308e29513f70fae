"""Headline table (issue #3): does SPF keep refusing *behaviour* while the model learns the task?

Models, all evaluated on the same held-out prompts (AdvBench rows never trained on):
  unaligned · aligned base · aligned + vanilla LoRA on SST-2 · aligned + vanilla LoRA on a harmful mix
  (p = 0.1) · the same two with SPF (subspace from ONE prompt the aligned model refuses + its own refusal,
  re-estimated every step).

    python experiments/headline.py prepare                # data + subspace (needs runs/aligned from `spf align`)
    python experiments/headline.py run JOB [JOB …]        # train-* and eval-* jobs (see JOBS); two lanes in parallel
    python experiments/headline.py report                 # → docs/results/headline.md
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# SPF_HEADLINE_WORK / SPF_HEADLINE_ALIGNED: rerun the table on another aligned base in its own folder
WORK = Path(os.environ.get("SPF_HEADLINE_WORK", ROOT / "runs" / "headline"))
DATA = WORK / "data"
ALIGNED = Path(os.environ.get("SPF_HEADLINE_ALIGNED", ROOT / "runs" / "aligned"))
BASE = "smollm2-135m-instruct"
TRAIN = ["--steps", "40", "--lr", "5e-4", "--batch-size", "8", "--lora-r", "8", "--seed", "0", "--threads", "1",
         "--eval-every", "0", "--heldout-n", "15", "--no-resume"]  # fmt: skip
FINETUNES = {
    "vanilla-sst2": ("sst2", "vanilla"),
    "vanilla-mix": ("mix", "vanilla"),
    "spf-sst2": ("sst2", "spf"),
    "spf-mix": ("mix", "spf"),
}
MODELS = ["unaligned", "aligned", *FINETUNES]
SUITES = {  # suite: extra eval flags
    "harmful": ["--limit", "50"],
    "overrefusal": [],
    "jailbreak": ["--limit", "4"],
    "prefill": ["--limit", "50"],
    "utility": ["--limit", "200", "--utility-tasks", "sst2"],
}


def spf(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "spf", *args], check=True)


def prepare() -> None:
    prepare_data()
    prepare_subspace()


def prepare_data() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    spf("data", "sst2", "--n", "400", "--seed", "0", "--out", str(DATA / "sst2.jsonl"))
    spf(
        "data",
        "harmful-mix",
        "--base",
        "sst2",
        "--p",
        "0.1",
        "--n",
        "400",
        "--seed",
        "0",
        "--out",
        str(DATA / "mix.jsonl"),
    )
    # held-out harmful prompts: AdvBench rows whose behaviour is not in the harmful mix
    mixed = {
        json.loads(line)["messages"][0]["content"] for line in (DATA / "mix.jsonl").read_text().splitlines()
    }
    with (SHARED / "safety" / "advbench_behaviors.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Behavior"] not in mixed]
    random.Random(0).shuffle(rows)
    with (DATA / "heldout_harmful.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["Behavior", "BehaviorID"])
        w.writeheader()
        for r in rows[:100]:
            w.writerow({"Behavior": r["Behavior"], "BehaviorID": r["BehaviorID"]})


def prepare_subspace() -> None:
    # the single sample: the first shipped harmful prompt the ALIGNED model refuses, with its own refusal
    spf("estimate", "--model", str(ALIGNED), "--sample", str(ROOT / "spf" / "data" / "refusals.jsonl"),
        "--own-response", "--rank", "8", "--out", str(WORK / "subspace"), "--threads", "1")  # fmt: skip


def model_args(name: str) -> list[str]:
    if name == "unaligned":
        return ["--model", BASE]
    if name == "aligned":
        return ["--model", str(ALIGNED)]
    return ["--model", str(ALIGNED), "--adapter", str(WORK / "ft" / name)]


def run(job: str) -> None:
    kind, name = job.split(":", 1)
    if kind == "train":
        data, method = FINETUNES[name]
        spf("train", "--model", str(ALIGNED), "--data", str(DATA / f"{data}.jsonl"), "--method", method,
            "--subspace", str(WORK / "subspace"), "--refresh-every", "1", "--rank", "8",
            "--heldout-safety", str(ROOT / "spf" / "data" / "refusals.jsonl"), *TRAIN, "--out", str(WORK / "ft" / name))  # fmt: skip
    else:
        model, suite = name.split("/")
        out = WORK / "eval" / model / suite
        if (out / "results.json").is_file():
            return
        spf("eval", *model_args(model), "--suite", suite, *SUITES[suite], "--prompts", str(DATA / "heldout_harmful.csv"),
            "--threads", "1", "--batch-size", "16", "--out", str(out))  # fmt: skip


def report() -> str:
    cols = [("harmful", "harmful rate"), ("overrefusal", "over-refusal"), ("jailbreak", "jailbreak success"),
            ("prefill", "prefill success"), ("utility", "SST-2 acc")]  # fmt: skip
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in MODELS:
        cells = []
        for suite, _ in cols:
            path = WORK / "eval" / m / suite / "results.json"
            if not path.is_file():
                cells.append("—")
                continue
            r = json.loads(path.read_text())["suites"][suite]
            cells.append(f"{r['rate']:.3f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] (n={r['n']})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["prepare", "prepare-data", "prepare-subspace", "run", "report", "jobs"])
    p.add_argument("jobs", nargs="*")
    a = p.parse_args()
    if a.what == "prepare":
        prepare()
    elif a.what == "prepare-data":
        prepare_data()
    elif a.what == "prepare-subspace":
        prepare_subspace()
    elif a.what == "jobs":
        print(" ".join([f"train:{f}" for f in FINETUNES] + [f"eval:{m}/{s}" for m in MODELS for s in SUITES]))
    elif a.what == "run":
        for j in a.jobs:
            run(j)
    else:
        print(report())


if __name__ == "__main__":
    main()
