#!/usr/bin/env bash
# The fine-tuned models whose answers the new judge labels are drawn from (issue 15: the aligned base, vanilla,
# SPF and Lisa after fine-tuning, and a terse-label SST-2 model). One lane, 1 torch thread by default.
#   bash experiments/judge_labels/train_models.sh RUNS_DIR   (RUNS_DIR/aligned must exist: spf align --out)
set -euo pipefail
runs=${1:?usage: train_models.sh RUNS_DIR}
threads=${SPF_THREADS:-1}
spf=${SPF:-.venv/bin/spf}
base=$runs/aligned
steps=${STEPS:-100}
[ -f "$runs/mix.jsonl" ] || $spf data harmful-mix --n 400 --p 0.1 --seed 0 --out "$runs/mix.jsonl"
[ -f "$runs/sst2.jsonl" ] || $spf data sst2 --n 400 --seed 0 --out "$runs/sst2.jsonl"
[ -d "$runs/sub" ] || $spf estimate --model "$base" --sample spf/data/refusals.jsonl --index 0 --rank 8 \
  --own-response --threads "$threads" --out "$runs/sub"
common=(--model "$base" --steps "$steps" --batch-size 8 --threads "$threads" --seed 0)
[ -d "$runs/vanilla_mix" ] || $spf train "${common[@]}" --data "$runs/mix.jsonl" --method vanilla --out "$runs/vanilla_mix"
[ -d "$runs/spf_mix" ] || $spf train "${common[@]}" --data "$runs/mix.jsonl" --method spf --subspace "$runs/sub" --out "$runs/spf_mix"
[ -d "$runs/lisa_mix" ] || $spf train "${common[@]}" --data "$runs/mix.jsonl" --method lisa \
  --safety-data spf/data/align_refusals.jsonl --out "$runs/lisa_mix"
[ -d "$runs/vanilla_sst2" ] || $spf train "${common[@]}" --steps 60 --data "$runs/sst2.jsonl" --method vanilla --out "$runs/vanilla_sst2"
echo "train_models: done"
