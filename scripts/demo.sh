#!/usr/bin/env bash
# Offline demo on the real SmolLM2-135M-Instruct: estimate the safety subspace from ONE
# (harmful prompt, refusal) pair, fine-tune LoRA vanilla vs SPF on a small sentiment task, compare the
# held-out refusal loss. Uses only data shipped in spf/data. ~3 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SPF=.venv/bin/spf
OUT=${SPF_DEMO_OUT:-runs/demo}
THREADS=${SPF_THREADS:-2}
STEPS=${SPF_DEMO_STEPS:-12}
$SPF estimate --model smollm2-135m-instruct --sample spf/data/refusals.jsonl --index 0 --rank 8 \
  --out "$OUT/subspace" --threads "$THREADS"
for method in vanilla spf; do
  $SPF train --model smollm2-135m-instruct --data spf/data/sentiment.jsonl --method "$method" \
    --subspace "$OUT/subspace" --refresh-every 1 --steps "$STEPS" --lr 1e-3 --batch-size 4 \
    --heldout-safety spf/data/refusals.jsonl --heldout-n 15 --eval-every 0 --threads "$THREADS" \
    --no-resume --out "$OUT/$method"
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print(f"\n{'method':<8} {'held-out refusal-loss rise':>27} {'task loss start→end':>22} {'s/step':>7}")
for m in ("vanilla", "spf"):
    s = json.load(open(f"{out}/{m}/metrics.json"))["summary"]
    print(f"{m:<8} {s['safety_loss_heldout_rise']:>+27.3f} {s['task_loss_start']:>11.3f}→{s['task_loss_end']:<10.3f} {s['mean_step_seconds']:>7.2f}")
PY
