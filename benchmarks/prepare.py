"""Measure `gpttrain prepare`: one JSON line with throughput and peak memory.

    python benchmarks/prepare.py --tokenizer gpt2 --tokenizer-file ../shared/data/gpt2.tiktoken
    python benchmarks/prepare.py --tokenizer bpe --vocab-size 8192 --workers 2
    python benchmarks/prepare.py big.txt --tokenizer byte

No INPUT = the embedded default corpus (the Python standard library's .py files). Output goes to a
temporary directory that is removed afterwards. Peak RSS is read with getrusage for this process and,
separately, for the largest of its finished children (the tokenizer workers).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

from gpttrain.data.prepare import prepare


def _peak_mb(who: int) -> float:
    kb = resource.getrusage(who).ru_maxrss
    return kb / (1 << 20) if sys.platform == "darwin" else kb / 1024  # bytes on macOS, KiB on Linux


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="inputs to prepare (default: the embedded corpus)")
    p.add_argument("--tokenizer", choices=("gpt2", "bpe", "byte"), default="gpt2", help="(default: gpt2)")
    p.add_argument("--tokenizer-file", default=None, help="gpt2 ranks file (default: tiktoken's cache)")
    p.add_argument("--vocab-size", type=int, default=8192, help="bpe vocabulary (default: 8192)")
    p.add_argument("--workers", type=int, default=0, help="0 = all cores (default: 0)")
    p.add_argument("--progress", action="store_true", help="show the progress bar (default: off)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="gpttrain-bench-") as tmp:
        t0 = time.perf_counter()
        meta = prepare(args.inputs, Path(tmp) / "out", tokenizer=args.tokenizer, tokenizer_file=args.tokenizer_file,
                       bpe_vocab_size=args.vocab_size, workers=args.workers, progress=args.progress)
        seconds = time.perf_counter() - t0
    mb = meta["total_text_bytes"] / 1e6
    tokens = meta["total_tokens"]
    self_mb, children_mb = _peak_mb(resource.RUSAGE_SELF), _peak_mb(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "tokenizer": args.tokenizer, "workers": args.workers, "mb": round(mb, 2), "tokens": tokens,
        "seconds": round(seconds, 2), "mb_per_s": round(mb / seconds, 2), "tok_per_s": round(tokens / seconds),
        "peak_rss_mb": round(max(self_mb, children_mb), 1), "peak_rss_self_mb": round(self_mb, 1),
        "peak_rss_child_mb": round(children_mb, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
