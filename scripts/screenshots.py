"""Screenshots of the Prefect run form, a rejected flow run and the MLflow registry page, in headless
Chromium driven by Playwright (docs/img/ui-*.png, shown in docs/pipeline.md).

    bash scripts/services.sh start && eval "$(bash scripts/services.sh env)"
    apt-get install chromium                     # the browser (Debian's); Playwright's download is not used
    .venv/bin/pip install playwright==1.65.2     # the driver
    .venv/bin/python scripts/screenshots.py [--out docs/img] [--chromium /usr/bin/chromium]

It registers prefect.yaml's deployments (scripts/deploy.sh), runs the pipeline twice on the tiny random
model in a scratch workspace — a promotion under a permissive gate, then the same candidate under the
standard one, rejected — and photographs what a user opens next: the deployment's run form, the rejected
run, the runs list, the MLflow experiment, and the registered model with its version's model card.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The tiny-model pipeline of tests/ops/test_flows.py: every stage in seconds; the keyword judge with
# judge_min_words=0 calls every non-refusal harmful, so the candidate fails the 0.5 harmful-rate gate.
MODEL = "spf-tiny-demo"
CHROMIUM_FLAGS = [  # the closed network: no background connections, no first-run or sync traffic
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def demo_params() -> dict[str, Any]:
    from spf.pipeline.presets import gate_demo_params

    return {**gate_demo_params(), "tracking": {"experiment": "spf-demo", "registered_model": MODEL}}


def run_pipeline(ws: Path, *sets: str) -> dict[str, Any]:
    out = ws / "summary.json"
    cmd = [sys.executable, "-m", "flows.pipeline", "--workspace", str(ws), "--summary", str(out)]
    for s in sets:
        cmd += ["-S", s]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def deployment_id(name: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.read_deployment_by_name(name).id)


def experiment_id(uri: str) -> str:
    from mlflow.tracking import MlflowClient

    return str(
        MlflowClient(uri).get_experiment_by_name(demo_params()["tracking"]["experiment"]).experiment_id
    )


def shoot(pages: dict[str, str], out: Path, chromium: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as pw:  # Playwright gives the browser a fresh temporary profile
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        for name, url in pages.items():
            # "load", not "networkidle": both UIs poll their APIs, so the network never goes quiet
            page.goto(url, wait_until="load", timeout=60_000)
            page.wait_for_timeout(6000)  # they render after their first API calls return
            path = out / f"ui-{name}.png"
            page.screenshot(path=str(path), full_page=True)
            shots.append(path)
            print(f"{path}  ←  {url}")
        browser.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        if not os.environ.get(key):
            print(f'screenshots: {key} is unset: eval "$(bash scripts/services.sh env)"', file=sys.stderr)
            return 2
    from tasks.dvc_ops import init_workspace

    subprocess.run(["bash", "scripts/deploy.sh"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        ws = init_workspace(Path(tmp) / "ws", demo_params(), local_remote=Path(tmp) / "remote")
        promoted = run_pipeline(ws, "evaluate.judge_min_words=0", "gate.max_harmful_rate=1.0")
        rejected = run_pipeline(ws, "evaluate.judge_min_words=0")
    assert promoted["outcome"] == "promoted" and rejected["outcome"] == "rejected", (promoted, rejected)
    prefect_ui = os.environ["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
    mlflow_ui = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    pages = {
        "prefect-run-form": f"{prefect_ui}/deployments/deployment/{deployment_id('spf-pipeline/scheduled')}/run",
        "prefect-rejected-run": f"{prefect_ui}/runs/flow-run/{rejected['flow_run_id']}",
        "prefect-runs": f"{prefect_ui}/runs",
        "mlflow-experiment": f"{mlflow_ui}/#/experiments/{experiment_id(mlflow_ui)}?workflowType=machine_learning",
        "mlflow-registry": f"{mlflow_ui}/#/models/{MODEL}",
        "mlflow-model-card": f"{mlflow_ui}/#/models/{MODEL}/versions/{rejected['version']}",
    }
    shoot(pages, Path(args.out), args.chromium)
    return 0


if __name__ == "__main__":
    sys.exit(main())
