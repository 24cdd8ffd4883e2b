"""Host time of the data pipeline per training step, on real shards: one JSON line per shape.

    python benchmarks/loader.py --data DIR                       # the GPU-speed issue's shapes
    python benchmarks/loader.py --data DIR --shapes 16x128x1 --steps 200

A shape is MICROBATCHxCONTEXTxACCUM. Each line has `ms_per_step` (the `next_batch()` calls of one optimizer
step: window lookup, gather from the memory-mapped shards, int64 tensors; on CUDA also the pinned copy), and
`share_at_target`: that time over the step time the GPU-speed issue's target throughput implies for the shape
(1.42B: 78k tok/s at 8x1024x4; 124M: 580k tok/s at 32x1024 and 12x1024). The training step never waits for the
GPU, so this host work overlaps the GPU's; the share says how much headroom is left before it could not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from gpttrain.data.loader import WindowLoader

# micro-batch x context x accumulation -> the target tokens/s for the model trained at that shape.
TARGETS = {"8x1024x4": 78_000, "16x1024x2": 78_000, "32x1024x1": 580_000, "12x1024x1": 580_000}


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        mb, ctx, accum = (int(v) for v in text.split("x"))
        return mb, ctx, accum
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not MICROBATCHxCONTEXTxACCUM (e.g. 32x1024x1)") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a prepared dir (gpttrain prepare ... --out DIR)")
    ap.add_argument("--shapes", nargs="+", default=list(TARGETS), metavar="MBxCTXxACCUM")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    for spec in args.shapes:
        mb, ctx, accum = parse_shape(spec)
        loader = WindowLoader(args.data, "train", context_length=ctx, micro_batch_size=mb, shuffle=True,
                              device=args.device)
        for _ in range(3):  # page in the shards' first pages, warm the pinned-memory pool
            loader.next_batch()
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps * accum):
            loader.next_batch()
        if args.device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / args.steps * 1000
        row = {"shape": spec, "device": args.device, "steps": args.steps, "ms_per_step": round(ms, 4),
               "tokens_per_step": mb * ctx * accum}
        target = TARGETS.get(spec)
        if target:
            step_ms = mb * ctx * accum / target * 1000
            row.update(target_tok_s=target, target_step_ms=round(step_ms, 2), share_at_target=round(ms / step_ms, 5))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
