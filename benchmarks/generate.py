"""Decoding speed with and without the KV cache, greedy, on a randomly initialised preset model.

    python benchmarks/generate.py --preset demo --new-tokens 512 [--prompt-tokens 16] [--device cpu] [--dtype fp32]
                                  [--repeats 5]

Prints one JSON line per measurement, then a summary line with the speedup (of the median times) and
whether both paths produced the same tokens. The two paths alternate, `--repeats` times each, so a
slow spell of a shared machine falls on both rather than on one. Without the cache every token
recomputes its whole window (the same sliding windows as the cached path; see gpttrain.sampling).
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each path; the median counts")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats: {args.repeats} must be at least 1")
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

    times: dict[str, list[float]] = {"cache": [], "nocache": []}
    tokens: dict[str, list[int]] = {}
    for rep in range(args.repeats):
        for name, use_cache in (("cache", True), ("nocache", False)):
            seconds, ids = _timed(model, prompt, args.new_tokens, use_cache, device)
            times[name].append(seconds)
            tokens[name] = ids
            print(json.dumps({"measure": f"generate_{name}", "repeat": rep, "preset": args.preset,
                              "device": str(device), "dtype": args.dtype, "new_tokens": len(ids),
                              "seconds": round(seconds, 4), "tok_s": round(len(ids) / seconds, 2)}), flush=True)
    tok_s = {name: len(tokens[name]) / statistics.median(ts) for name, ts in times.items()}

    summary = {
        "preset": args.preset,
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "tok_s_cache": round(tok_s["cache"], 2),
        "tok_s_nocache": round(tok_s["nocache"], 2),
        "speedup": round(tok_s["cache"] / tok_s["nocache"], 2),
        "speedup_per_repeat": [round(n / c, 2) for c, n in zip(times["cache"], times["nocache"])],
        "outputs_equal": tokens["cache"] == tokens["nocache"],
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
