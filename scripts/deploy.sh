#!/usr/bin/env bash
# Register the SPF deployments (prefect.yaml) on a Prefect server and, with --workers, start one worker per
# pool. Needs PREFECT_API_URL (e.g. `eval "$(bash scripts/services.sh env)"` after `scripts/services.sh start`).
#   spf-cpu: process pool for the pipeline flow (scheduled + UI/CLI-triggered runs)
#   spf-gpu: process pool locally for the fine-tuning flow, concurrency 1 (one job per GPU). On a cluster,
#            create it instead with:  prefect work-pool create spf-gpu --type kubernetes \
#                                       --base-job-template deploy/k8s/gpu-base-job-template.json
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
: "${PREFECT_API_URL:?set PREFECT_API_URL (eval \"\$(bash scripts/services.sh env)\")}"
RUN_DIR=${SPF_SERVICES_DIR:-runs/services}
mkdir -p "$RUN_DIR"

for pool in spf-cpu spf-gpu; do
  prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process >/dev/null
done
prefect work-pool set-concurrency-limit spf-gpu 1 >/dev/null
prefect --no-prompt deploy --all

if [ "${1:-}" = "--workers" ]; then
  for pool in spf-cpu spf-gpu; do
    pidfile="$RUN_DIR/worker-$pool.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then continue; fi
    # the deployments' pull step runs each flow in $SPF_WORKSPACE (prefect.yaml): this checkout by default
    SPF_WORKSPACE="${SPF_WORKSPACE:-$PWD}" nohup prefect worker start --pool "$pool" >"$RUN_DIR/worker-$pool.log" 2>&1 &
    echo $! >"$pidfile"
    echo "worker for $pool: pid $(cat "$pidfile"), log $RUN_DIR/worker-$pool.log"
  done
fi
