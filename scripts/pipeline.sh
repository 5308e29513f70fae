#!/usr/bin/env bash
# Run the whole SPF pipeline once, offline, on the real SmolLM2-135M-Instruct (CPU is fine):
#   DVC-versioned data → align → single-sample safety subspace → SPF fine-tuning → evaluation →
#   MLflow run + registered version (`challenger`) → promotion gate (`champion` or a recorded refusal).
# No server needed: Prefect runs in ephemeral mode, MLflow uses runs/mlflow/mlflow.db, DVC the local remote
# (runs/dvc-remote). Point at servers with PREFECT_API_URL / MLFLOW_TRACKING_URI (scripts/services.sh env).
# Extra arguments are parameter overrides, e.g.  bash scripts/pipeline.sh -S finetune.method=vanilla
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Prefect's ephemeral server (no PREFECT_API_URL) migrates its database on first start: give slow/loaded
# machines more than the default 20 s
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-180}
mkdir -p runs/pipeline
start=$(date +%s)
python -m flows.pipeline --summary runs/pipeline/summary.json "$@"
echo "pipeline: $(( $(date +%s) - start )) s end to end; summary in runs/pipeline/summary.json"
