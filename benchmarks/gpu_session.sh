#!/usr/bin/env bash
# The GPU checks of a device session, in one call of at most ~9 minutes (the device image has torch, numpy,
# tiktoken, tokenizers, safetensors, matplotlib, tqdm, pytest; the package runs from src/ without installing):
#   bash benchmarks/fetch_gpu_wheels.sh                 # here, once: torchao for --train.fp8, into .whl/
#   bash benchmarks/gpu_session.sh                      # there (device tool, carry [".whl"]): tests, then timings
#   DEVICE=cpu RUNS="tiny:4x1 demo:8x1+train.attention=math" STEPS=2 BUDGET=60 bash benchmarks/gpu_session.sh
# Runs are in priority order and benchmarks/train.py starts none after BUDGET seconds, so the call ends in time
# with what it measured. Everything it prints is also written under $OUT (the device tool brings it back).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels (torchao), installed beside the image's packages
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
OUT="${OUT:-$(mktemp -d)}"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-10}"
BUDGET="${BUDGET:-380}"
# The issue's targets first (1.42B at 8x4, 124M at 32), then one change at a time against them, then the rest
# of the reference table.
RUNS="${RUNS:-gpt-1.4b:8x4 gpt2-124m:32x1 gpt2-124m:32x1+train.attention=cudnn gpt2-124m:32x1+train.compile_scope=blocks
gpt-1.4b:8x4+train.fp8=true gpt2-124m:32x1+train.fp8=true gpt-1.4b:8x4+train.fused_loss=off gpt2-124m:12x1
gpt-1.4b:16x2 gpt2-124m:32x1+train.attention=flash gpt2-124m:32x1+train.compile_mode=max-autotune-no-cudagraphs}"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1 | tee "$OUT/env.txt"
python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -n 1 | tee -a "$OUT/env.txt"
if [ "$DEVICE" = cuda ]; then
    timeout 200 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 15
fi
# shellcheck disable=SC2086  # RUNS is a list
python3 benchmarks/train.py --device "$DEVICE" --runs $RUNS --steps "$STEPS" --warmup 3 \
    --budget-s $((BUDGET - (SECONDS - T0))) --run-dir "$OUT/runs" 2>&1 | tee "$OUT/train_bench.jsonl"
rm -rf "$OUT/runs"  # run dirs are not results (and deep paths do not come back)
echo "done in $((SECONDS - T0)) s; results in $OUT"
