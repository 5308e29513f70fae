"""Orchestration overhead: the same pipeline work run (a) as plain ``spf`` stages and (b) through the
Prefect flow with MLflow tracking, registry gate and DVC versioning — side by side, in one invocation.

Each variant runs in a fresh subprocess and a fresh copy of the workspace (so neither reuses the other's
outputs or caches), on the same parameters. Variants alternate (direct, flow, direct, flow …) so a noisy
neighbour hits both. Prints wall times and the overhead ratio (flow − direct) / flow.

    python benchmarks/bench_orchestration.py                 # real SmolLM2, short fine-tune (~10 min)
    python benchmarks/bench_orchestration.py --tiny          # tiny random model (overhead-dominated)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spf.pipeline.presets import smoke_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

REAL = {
    "prepare": {"scenario": "sst2", "n": 200},
    "align": {"enabled": False},  # align is cached in practice ("rarely re-run"): measure the rest
    "finetune": {"steps": 10, "save_every": 0, "eval_every": 5},
    "evaluate": {"suites": ["harmful", "overrefusal", "utility"], "limit": 20, "utility_limit": 50},
    "tracking": {"experiment": "bench-orchestration", "registered_model": "bench-orchestration"},
}
TINY = {
    **smoke_params(),
    "tracking": {"experiment": "bench-orchestration", "registered_model": "bench-orchestration-tiny"},
}

DIRECT = """
import json, sys, time
from spf.pipeline.params import load_params
from spf.pipeline.stages import STAGES, run_stage
p = load_params("params.yaml")
out = {s: run_stage(s, p)["seconds"] for s in STAGES}
print(json.dumps(out))
"""


def make_workspace(base: Path, params: dict) -> Path:
    from tasks.dvc_ops import init_workspace

    ws = Path(tempfile.mkdtemp(prefix="ws-", dir=base))
    return init_workspace(ws, params, local_remote=ws / "remote")


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="runs/bench_orchestration.json")
    args = ap.parse_args()
    params = TINY if args.tiny else REAL
    if not args.tiny:
        aligned = ROOT / "runs" / "aligned"  # an aligned base from `spf align` (refuses the safety sample)
        if aligned.is_dir():
            params["align"]["model"] = str(aligned)
        else:
            params["estimate"] = {"own_response": False}
    base = Path(tempfile.mkdtemp(prefix="spf-bench-orch-"))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{base / 'mlflow.db'}",
        "PREFECT_HOME": str(base / "prefect"),  # no cached results from earlier runs
        # a fresh ephemeral server migrates its database first: slow on a loaded 2-core machine
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    rows = []
    for i in range(args.repeats):
        ws_direct = make_workspace(base, params)
        # -P: the workspace (cwd) holds a partial spf/ copy (DVC deps) that must not shadow the package
        direct = run([sys.executable, "-P", "-c", DIRECT], ws_direct, env)
        ws_flow = make_workspace(base, params)
        # cwd = the repository (python -m puts cwd on sys.path; the workspace has a partial spf/ copy)
        flow = run(
            [
                sys.executable,
                "-m",
                "flows.pipeline",
                "--workspace",
                str(ws_flow),
                "--summary",
                str(ws_flow / "s.json"),
            ],
            ROOT,
            env,
        )
        stage_s = json.loads((ws_flow / "s.json").read_text())["stage_seconds"]
        rows.append({"repeat": i, "direct_s": direct, "flow_s": flow, "flow_stage_seconds": stage_s})
        print(f"repeat {i}: direct {direct:.1f} s, flow {flow:.1f} s, overhead {(flow - direct) / flow:.1%}")
    direct = sum(r["direct_s"] for r in rows) / len(rows)
    flow = sum(r["flow_s"] for r in rows) / len(rows)
    result = {
        "model": "tiny-llama" if args.tiny else "smollm2-135m-instruct",
        "params": params,
        "rows": rows,
        "direct_s": direct,
        "flow_s": flow,
        "overhead_fraction": (flow - direct) / flow,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nmean: direct {direct:.1f} s | flow (Prefect + MLflow + DVC) {flow:.1f} s | "
        f"overhead {flow - direct:.1f} s = {(flow - direct) / flow:.1%} of end-to-end (target ≤ 10%)"
    )
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
