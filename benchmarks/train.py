"""Training throughput of several presets in one call: one JSON line per run, then a summary line.

    python benchmarks/train.py --device cuda                       # the GPU-speed issue's table
    python benchmarks/train.py --device cpu --runs tiny:4x1 demo:8x1 --steps 3   # a CPU rehearsal
    python benchmarks/train.py --runs gpt2-124m:32x1 gpt2-124m:32x1+train.attention=cudnn+train.fp8=true

A run is PRESET:MBxACCUM, then any number of +key=value config settings (the variant being measured; they
are echoed in the row as `variant`). `--budget-s` stops starting new runs once that many seconds have gone,
and `--run-timeout-s` stops a run that takes longer, so a device session's one call ends in time with whatever
it measured so far.

Each run is `gpttrain bench` in its own process (a clean CUDA context and compile cache each), so every
line carries the card's bf16 matmul peak measured in that same process next to our model TFLOP/s
(`peak_ratio`), plus `mfu` against the datasheet peak and the peak memory. With `--data DIR` a second
line per run times the same steps on real shards, and the summary reports the data pipeline's cost
(`data_overhead`: real-data step time over synthetic step time - 1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

# preset:micro_batch x accumulation, as in the GPU-speed issue's reference table.
DEFAULT_RUNS = ("gpt-1.4b:8x4", "gpt-1.4b:16x2", "gpt2-124m:12x1", "gpt2-124m:32x1")


def parse_run(text: str) -> tuple[str, int, int, dict[str, str]]:
    """`gpt2-124m:32x1+train.fp8=true` -> ("gpt2-124m", 32, 1, {"train.fp8": "true"})."""
    head, *settings = text.split("+")
    try:
        preset, shape = head.split(":")
        mb, accum = shape.split("x")
        variant = dict(s.split("=", 1) for s in settings)
        return preset, int(mb), int(accum), variant
    except ValueError:
        raise SystemExit(f"--runs: {text!r} is not PRESET:MBxACCUM[+key=value...] (e.g. gpt2-124m:32x1 or "
                         "gpt2-124m:32x1+train.attention=cudnn)") from None


def bench(preset: str, mb: int, accum: int, variant: dict[str, str], args, data: str | None) -> dict:
    cmd = [sys.executable, "-m", "gpttrain", "bench", "--preset", preset, "--device", args.device,
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--run-dir", args.run_dir,
           "--train.micro_batch_size", str(mb), "--train.grad_accum_steps", str(accum),
           "--train.compile", args.compile, "--train.precision", args.precision, *args.extra]
    for key, value in variant.items():
        cmd += [f"--{key}", value]
    if data:
        cmd += ["--data", data]
    t0 = time.perf_counter()
    row = head_of(preset, mb, accum, variant)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout_s)
    except subprocess.TimeoutExpired as e:
        row["error"] = f"timed out after --run-timeout-s {args.run_timeout_s:g}"
        out = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        print(f"--- {' '.join(cmd)} timed out; its last lines:", *out.strip().splitlines()[-40:], sep="\n",
              file=sys.stderr, flush=True)
    else:
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        if r.returncode != 0 or not lines:
            out = (r.stderr or r.stdout).strip().splitlines()
            row["error"] = " | ".join(out[-3:])
            # The traceback's end on stderr too (the session log keeps it): one call may be all a device session
            # has.
            print(f"--- {' '.join(cmd)} failed (exit {r.returncode}); its last lines:", *out[-40:], sep="\n",
                  file=sys.stderr, flush=True)
        else:
            row = {**row, **json.loads(lines[-1])}
    row["wall_s"] = round(time.perf_counter() - t0, 1)  # the whole process: start, compile, timing, matmul peak
    return row


def head_of(preset: str, mb: int, accum: int, variant: dict[str, str]) -> dict:
    """The fields every row starts with, whether it ran (bench's own fields follow), failed or was not started."""
    return {"preset": preset, "micro_batch_size": mb, "grad_accum_steps": accum, "variant": variant}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), metavar="PRESET:MBxACCUM")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--data", default=None, help="also time each run on these prepared shards")
    ap.add_argument("--run-dir", default="runs/bench")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new run after this many seconds")
    ap.add_argument("--run-timeout-s", type=float, default=None, help="stop a run that takes longer than this")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for gpttrain bench")
    args = ap.parse_args(argv)
    runs = [parse_run(spec) for spec in args.runs]  # all checked before the first one starts
    summary = []
    start = time.perf_counter()
    def spent() -> bool:
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    for preset, mb, accum, variant in runs:
        if spent():
            summary.append(dict(head_of(preset, mb, accum, variant),
                                error=f"not run: --budget-s {args.budget_s:g} spent"))
            continue
        row = bench(preset, mb, accum, variant, args, None)
        print(json.dumps(row), flush=True)
        item = {k: row.get(k) for k in ("preset", "micro_batch_size", "grad_accum_steps", "variant", "tok_per_s",
                                          "tflops", "peak_ratio", "mfu", "mem_peak_gib", "mem_estimate_gib", "overhead",
                                          "wall_s", "error")}
        if args.data and "error" not in row and not spent():
            real = bench(preset, mb, accum, variant, args, args.data)
            print(json.dumps(real), flush=True)
            if "step_s" in real:
                item["data_overhead"] = real["step_s"] / row["step_s"] - 1
        summary.append(item)
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
