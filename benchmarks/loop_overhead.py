"""What the whole training loop costs over the bare step: one JSON line.

    python benchmarks/loop_overhead.py RUN_DIR BENCH_JSONL PRESET MICRO_BATCH

RUN_DIR is a `gpttrain train` run on real shards (its last eval record's `avg_tok_per_s` covers every timed
step: data loading, logging, the reads at log steps; evaluation time is left out of it), BENCH_JSONL the
output of benchmarks/train.py with a plain (no variant) row of the same preset and micro-batch at
accumulation 1 (synthetic tokens, the step alone). `loop_overhead` = bench tokens/s over loop tokens/s - 1;
the GPU-speed issue's target is <= 0.02. benchmarks/gpu_session.sh runs both and then this.

From the run's `summary` record: `eval_share`, evaluation's share of the time at the run's cadence (a mean
evaluation after the first, which compiles, over itself plus eval_every mean steps; see the trainer's
LoopClock), and `with_eval_overhead`, the overhead with the loop's tokens/s taken net of it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gpttrain.errors import DataError
from gpttrain.plot import METRICS_FILE, read_metrics


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        raise SystemExit(__doc__)
    run_dir, bench_file, preset, mb = Path(argv[0]), Path(argv[1]), argv[2], int(argv[3])
    metrics_file = run_dir / METRICS_FILE
    try:
        metrics = read_metrics(metrics_file)  # {kind: records by step}; skips a last line cut short by a kill
    except DataError as e:
        raise SystemExit(str(e)) from None
    evals = [r for r in metrics.get("eval", []) if r.get("avg_tok_per_s")]
    if not evals:
        raise SystemExit(f"{metrics_file}: no eval record with avg_tok_per_s (did the run finish?)")
    loop = evals[-1]["avg_tok_per_s"]
    rows = [json.loads(line) for line in bench_file.read_text().splitlines() if line.startswith('{"preset"')]
    same = [r for r in rows if r["preset"] == preset and r.get("micro_batch_size") == mb and not r.get("variant")
            and r.get("grad_accum_steps") == 1 and "tok_per_s" in r]
    bench = same[0]["tok_per_s"] if same else None
    out = {"loop": f"{preset}:{mb}", "loop_tok_per_s": loop, "bench_tok_per_s": bench,
           "loop_overhead": bench / loop - 1 if bench else None}
    summary = metrics.get("summary", [])
    share = summary[-1].get("eval_share") if summary else None
    if share is not None:
        with_eval = loop * (1 - share)
        out.update(eval_share=share, evals=summary[-1]["evals"], with_eval_tok_per_s=with_eval,
                   with_eval_overhead=bench / with_eval - 1 if bench else None)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
