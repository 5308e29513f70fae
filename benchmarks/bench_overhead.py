"""SPF overhead vs vanilla LoRA, measured side by side in one run (same model, data, batch, steps).

Each configuration trains in its own subprocess (so peak RSS is its own); configurations run in
interleaved rounds to spread machine noise. Prints medians and the ratios the acceptance asks for:
  * SPF step time / vanilla step time, re-estimating every step (T=1) and every 10 steps (T=10)
  * one re-estimation / one vanilla training step
  * peak RSS / vanilla peak RSS

    python benchmarks/bench_overhead.py [--batch-size 4] [--steps 12] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "vanilla": {"method": "vanilla"},
    "spf-T1": {"method": "spf", "refresh_every": 1},  # the shipped estimate route (spf.estimate's default)
    "spf-T1-separate": {"method": "spf", "refresh_every": 1, "estimate": "separate"},
    # the safety sample rides in the step's batch: one forward, one backward (spf.core.fused)
    "spf-T1-fused": {"method": "spf", "refresh_every": 1, "estimate": "fused"},
    "spf-T10-fused": {"method": "spf", "refresh_every": 10, "estimate": "fused"},
    "spf-margin-T1-fused": {"method": "spf", "refresh_every": 1, "loss": "margin", "estimate": "fused"},
    "spf-T10": {"method": "spf", "refresh_every": 10},
    "spf-T50": {"method": "spf", "refresh_every": 50},
    "spf-never": {"method": "spf", "refresh_every": 0},
    # margin subspace (refusal vs compliant opening: two sequences per re-estimation)
    "spf-margin-T1": {"method": "spf", "refresh_every": 1, "loss": "margin"},
    "spf-margin-T10": {"method": "spf", "refresh_every": 10, "loss": "margin"},
    "spf-margin-T20": {"method": "spf", "refresh_every": 20, "loss": "margin"},
    # baselines (issue #5): SafeGrad pays a safety-batch forward+backward every step; Lisa's proximal term is
    # cheap but its alignment steps are training steps on other data; SafeInstr only changes the data
    "safegrad": {"method": "safegrad"},
    "lisa": {"method": "lisa"},
    "safeinstr": {"method": "safeinstr"},
}


def child(args: argparse.Namespace) -> None:
    from spf import TrainConfig, train

    conf = CONFIGS[args.config]
    cfg = TrainConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        method=conf["method"],
        steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-3,
        max_length=256,
        threads=args.threads,
        eval_every=0,
        task_eval_n=1,
        resume=False,
        spf={"subspace": args.subspace, "rank": 8, "refresh_every": conf.get("refresh_every", 1)}
        | ({"estimate": conf["estimate"]} if "estimate" in conf else {}),
        baselines={"safety_data": str(ROOT / "spf" / "data" / "align_refusals.jsonl")}
        if conf["method"] in ("safegrad", "lisa", "safeinstr")
        else {},
    )
    res = train(cfg)
    steps = res.metrics["steps"][1:]  # the first step pays one-off allocation costs
    out = {
        "step_seconds": [s["step_seconds"] for s in steps],
        "refresh_seconds": [s["spf/refresh_seconds"] for s in steps if s.get("spf/refreshed")],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(ROOT / "spf" / "data" / "sentiment.jsonl"))
    p.add_argument("--safety-sample", default=str(ROOT / "spf" / "data" / "refusals.jsonl"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--configs", nargs="*", default=["vanilla", "spf-T1-separate", "spf-T1-fused", "spf-T10", "safegrad"]
    )
    p.add_argument(
        "--json", default=None, help="also write the results to this JSON file (spf bench report reads it)"
    )
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--subspace", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.config:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        subs: dict[str, Path] = {}
        for loss in sorted({CONFIGS[c].get("loss", "ce") for c in args.configs}):
            subs[loss] = Path(tmp) / f"subspace-{loss}"
            subprocess.run(
                [sys.executable, "-m", "spf", "estimate", "--model", args.model, "--sample", args.safety_sample,
                 "--index", "0", "--rank", "8", "--loss", loss, "--out", str(subs[loss]), "--threads", str(args.threads)],
                check=True, capture_output=True,
            )  # fmt: skip
        results: dict[str, list[dict]] = {c: [] for c in args.configs}
        for r in range(args.rounds):
            for c in args.configs:
                cmd = [sys.executable, __file__, "--config", c, "--out", str(Path(tmp) / f"{c}-{r}"),
                       "--subspace", str(subs[CONFIGS[c].get("loss", "ce")]), "--model", args.model, "--data", args.data,
                       "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
                proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
                line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
                results[c].append(json.loads(line[len("RESULT ") :]))
                print(f"round {r} {c}: done", file=sys.stderr)

    def med_step(c: str) -> float:
        return statistics.median(x for res in results[c] for x in res["step_seconds"])

    def mean_step(c: str) -> float:
        # the amortised cost: a re-estimation every T steps shows up in the mean, not in the median
        return statistics.mean(x for res in results[c] for x in res["step_seconds"])

    def peak(c: str) -> float:
        return max(res["peak_rss_mb"] for res in results[c])

    base_t, base_m = med_step("vanilla"), peak("vanilla")
    base_mean = mean_step("vanilla")
    print(f"model {args.model}, LoRA r=8 all linears, batch {args.batch_size}, {args.steps} steps × {args.rounds} rounds, "
          f"{args.threads} thread(s)")  # fmt: skip
    print(f"{'config':<15} {'median step s':>14} {'× vanilla':>10} {'mean step s':>12} {'× vanilla':>10} {'peak RSS MB':>12} {'× vanilla':>10}")  # fmt: skip
    for c in args.configs:
        print(
            f"{c:<15} {med_step(c):>14.3f} {med_step(c) / base_t:>10.2f} {mean_step(c):>12.3f} "
            f"{mean_step(c) / base_mean:>10.2f} {peak(c):>12.0f} {peak(c) / base_m:>10.2f}"
        )
    per_step = next((c for c in ("spf-T1", "spf-T1-separate", "spf-T1-fused") if c in results), None)
    refresh = [x for res in results.get(per_step, []) for x in res["refresh_seconds"]] if per_step else []
    if refresh:
        r = statistics.median(refresh)
        print(
            f"one re-estimation ({per_step}): median {r:.3f} s = {r / base_t:.2f} × a vanilla training step"
        )
    if args.json:
        sys.path.insert(0, str(ROOT))
        from spf.io import save_json

        save_json(
            {
                "command": "python benchmarks/bench_overhead.py " + " ".join(sys.argv[1:]),
                "model": args.model,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "rounds": args.rounds,
                "threads": args.threads,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "configs": {
                    c: {
                        **CONFIGS[c],
                        "median_step_s": med_step(c),
                        "step_ratio": med_step(c) / base_t,
                        "mean_step_s": mean_step(c),
                        "mean_ratio": mean_step(c) / base_mean,
                        "peak_rss_mb": peak(c),
                        "rss_ratio": peak(c) / base_m,
                        "n_steps": sum(len(res["step_seconds"]) for res in results[c]),
                    }
                    for c in args.configs
                },
                "refresh_median_s": statistics.median(refresh) if refresh else None,
            },
            args.json,
            tracked_ok=True,  # docs/results/overhead.json is committed on purpose
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
