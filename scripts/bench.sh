#!/usr/bin/env bash
# The benchmark in one command (issue #5): every defense × threat scenario + the SPF ablations on the aligned
# SmolLM2 (5 training seeds per cell, each along an exposure curve), then docs/results.md — tables, paired
# tests, exposure curves — regenerated from the cells' JSON.
#   bash scripts/bench.sh [bench/cpu.yaml] [extra `spf bench run` flags, e.g. --only spf@ vanilla@ --lanes 1]
# The primary comparison first (about 9 h of bench/cpu.yaml on 2 lanes; its header has the full estimate):
#   bash scripts/bench.sh bench/cpu.yaml --only ref: vanilla@mix10 spf@mix10
# Makes the aligned base first when the benchmark's `aligned` folder is missing (the recipe of
# docs/results/headline.md, "Sixth attempt"). Resumable: rerun to continue; finished cells are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
config=${1:-bench/cpu.yaml}
shift || true
aligned=$(python -c "import sys; from spf.bench.config import load_bench_config; print(load_bench_config(sys.argv[1]).aligned)" "$config")
if [[ "$aligned" == runs/* && ! -f "$aligned/model.safetensors" ]]; then
  echo "aligned base $aligned missing: building it (spf align, ~30 min on 2 CPU cores)"
  python experiments/align_data.py --out runs/align_data
  python -m spf align --out "$aligned" --refusals runs/align_data/refusals.jsonl --n-refusals 100 \
    --benign spf/data/align_benign.jsonl runs/align_data/benign_public.jsonl --steps 150 --lr 5e-4 \
    --max-new-tokens 64 --unlikelihood-weight 0.1 --threads 1
fi
start=$(date +%s)
python -m spf bench run "$config" "$@" || echo "some cells failed: see the bench's logs/ folder; rerun to retry them"
python -m spf bench report "$config"
echo "bench: $(( $(date +%s) - start )) s"
