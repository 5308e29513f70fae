#!/usr/bin/env bash
# Issue #5 on a GPU machine, in one go (was ≤ 10 minutes on one H200 at one seed; with 5 seeds and the exposure curve not yet timed), printing the results table last.
#   bash scripts/gpu_bench.sh
# * SPF_GPU_MODEL=/path/to/instruct-model (a local safetensors folder, e.g. Llama-3.2-1B-Instruct): when set
#   and present, the benchmark runs on it as the aligned base (such models ship safety-tuned) — no align step;
# * otherwise SmolLM2-135M is aligned here (spf align on CUDA, ~1 min) and benchmarked at full scale
#   (bench/gpu.yaml: 100 steps, full evaluation sets).
# Needs the project installed (pip install -e .[dev]) and the public data at ../shared/data or SPF_SHARED_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] && export PATH="$PWD/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run bench/cpu.yaml instead')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
mkdir -p runs/gpu
start=$(date +%s)
cfg=runs/gpu/bench.yaml
if [[ -n "${SPF_GPU_MODEL:-}" && -f "${SPF_GPU_MODEL}/config.json" ]]; then
  echo "benchmarking the local model $SPF_GPU_MODEL"
  python - "$SPF_GPU_MODEL" "$cfg" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("bench/gpu.yaml"))
cfg.update(aligned=sys.argv[1], unaligned=None, name=f"gpu: {sys.argv[1]}")
yaml.safe_dump(cfg, open(sys.argv[2], "w"), sort_keys=False)
PY
else
  cp bench/gpu.yaml "$cfg"
  if [[ ! -f runs/gpu/aligned/model.safetensors ]]; then
    python experiments/align_data.py --out runs/gpu/align_data
    python -m spf align --out runs/gpu/aligned --refusals runs/gpu/align_data/refusals.jsonl --n-refusals 100 \
      --benign spf/data/align_benign.jsonl runs/gpu/align_data/benign_public.jsonl --steps 150 --lr 5e-4 \
      --max-new-tokens 64 --unlikelihood-weight 0.1 --device cuda
  fi
fi
echo "setup: $(( $(date +%s) - start )) s"
python -m spf bench run "$cfg" || echo "some cells failed: see runs/bench/gpu/logs"
python -m spf bench report "$cfg"
echo "total: $(( $(date +%s) - start )) s"
cat docs/results_gpu.md
