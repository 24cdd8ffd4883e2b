"""Decoding speed with and without the KV cache, greedy, on a randomly initialised preset model.

    python benchmarks/generate.py --preset demo --new-tokens 512 [--prompt-tokens 16] [--device cpu] [--dtype fp32]

Prints one JSON line per measurement, then a summary line with the speedup and whether both
paths produced the same tokens. Without the cache every token recomputes its whole window
(the same sliding windows as the cached path; see gpttrain.sampling).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gpttrain.config import resolve
from gpttrain.model import build_model
from gpttrain.sampling import generate_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(model, prompt: torch.Tensor, n: int, use_cache: bool, device: torch.device) -> tuple[float, list[int]]:
    _sync(device)
    t0 = time.perf_counter()
    out = generate_ids(model, prompt, n, temperature=0.0, eot_id=None, use_cache=use_cache)
    _sync(device)
    return time.perf_counter() - t0, out[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cfg = resolve(args.preset).model
    torch.manual_seed(args.seed)
    model = build_model(cfg, device).to(DTYPES[args.dtype]).eval()
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), generator=gen).to(device)  # (1, T)

    for use_cache in (True, False):
        _timed(model, prompt, args.warmup_tokens, use_cache, device)

    results = {}
    for name, use_cache in (("cache", True), ("nocache", False)):
        seconds, ids = _timed(model, prompt, args.new_tokens, use_cache, device)
        tok_s = len(ids) / seconds
        results[name] = (tok_s, ids)
        print(json.dumps({"measure": f"generate_{name}", "preset": args.preset, "device": str(device),
                          "dtype": args.dtype, "new_tokens": len(ids), "seconds": round(seconds, 4),
                          "tok_s": round(tok_s, 2)}), flush=True)

    summary = {
        "preset": args.preset,
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "tok_s_cache": round(results["cache"][0], 2),
        "tok_s_nocache": round(results["nocache"][0], 2),
        "speedup": round(results["cache"][0] / results["nocache"][0], 2),
        "outputs_equal": results["cache"][1] == results["nocache"][1],
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
