#!/usr/bin/env bash
# The GPU checks of a device session, in one call (the device image has torch, numpy, tiktoken, tokenizers,
# safetensors, matplotlib, tqdm, pytest and transformers; the package runs from src/ without installing):
#   bash benchmarks/gpu_session.sh                      # on the GPU machine: CUDA tests, then the speed table
#   DEVICE=cpu RUNS="tiny:4x1 demo:8x1" STEPS=2 bash benchmarks/gpu_session.sh   # a rehearsal on CPU
# Everything it prints is also written under $OUT (the device tool brings that folder back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$(mktemp -d)}"
DEVICE="${DEVICE:-cuda}"
RUNS="${RUNS:-gpt-1.4b:8x4 gpt-1.4b:16x2 gpt2-124m:12x1 gpt2-124m:32x1}"
STEPS="${STEPS:-10}"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
if [ "$DEVICE" = cuda ]; then
    python3 -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 15
fi
# shellcheck disable=SC2086  # RUNS is a list
python3 benchmarks/train.py --device "$DEVICE" --runs $RUNS --steps "$STEPS" --warmup 3 \
    --run-dir "$OUT/runs" 2>&1 | tee "$OUT/train_bench.jsonl"
echo "results in $OUT"
