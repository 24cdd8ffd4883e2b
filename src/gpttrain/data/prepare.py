"""Text sources -> token shards + meta.json, streaming in bounded memory, in worker processes.

The way through:
  inputs (files, directories, globs, .jsonl; none = the Python standard library's own sources)
  -> documents -> train/val sides -> text pieces cut where tokenization cannot change
  -> tasks tokenized by a process pool, results taken back in order
  -> `train-NNNNN.bin` / `val-NNNNN.bin` shards in a temp dir beside `out`
  -> moved into `out`, `meta.json` written last.

The inputs, documents, text pieces and the train/val split rule live in `gpttrain.data.sources`; the
process pool that tokenizes the tasks in `gpttrain.data.encode`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import math
import numbers
import os
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from gpttrain import __version__
from gpttrain.data.encode import SUB_PIECE_CHARS, make_tasks, ordered_results
from gpttrain.data.shards import (
    FORMAT_VERSION,
    META_NAME,
    SPLITS,
    TOKENIZER_FILES,
    ShardWriter,
    file_sha256,
    install,
    load_meta,
    make_temp_dir,
    remove_tree,
    token_dtype,
    verify_dir,
    write_atomic,
)
from gpttrain.data.sources import (
    TRAIN,
    VAL,
    _choose_split_mode,
    _normalize_extensions,
    _resolve_keyed,
    _segments,
    _source_records,
    check_text_file,
    default_corpus_files,
    documents_for_a_document_split,
    resolve_inputs,
)
from gpttrain.errors import ConfigError, DataError
from gpttrain.tokenizer import BPETokenizer, ByteTokenizer, GPT2Tokenizer, Tokenizer, from_spec, payload_of

__all__ = [
    "add_prepare_arguments", "default_corpus_files", "load_meta", "open_tokenizer", "prepare", "resolve_inputs",
    "run_prepare",
]

logger = logging.getLogger("gpttrain")

TOKENIZERS = ("gpt2", "bpe", "byte")
DEFAULT_OUT = "data/prepared"
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VOCAB_SIZE = 8192  # of a bpe tokenizer trained here
DEFAULT_BPE_TRAIN_MB = 0  # 0 = all of the train split's text; bpe training runs at about 10 MB/s on 2 cores
PIECE_CHARS = 1 << 20  # text handed to a worker per task
GOLDEN_RATIO_FRACTION = (5 ** 0.5 - 1) / 2  # steps of a low-discrepancy sequence: the bpe sample's choice
# workers=0 starts one worker per this many input bytes at most: below that, start-up (~0.3 s) outweighs the gain
AUTO_BYTES_PER_WORKER = {"byte": 64 << 20, "gpt2": 8 << 20, "bpe": 2 << 20}


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: tqdm draws only where stderr is a terminal; in a file or a pipe a bar is noise.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None if enabled else True,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def _train_bpe(keyed: list[tuple[Path, str]], text_field: str, vocab_size: int, total: int,
               progress: bool, mode: str, val_fraction: float, train_bytes: int | None = None) -> BPETokenizer:
    """Train on the train split's text (the val split's stays unseen, as it is by the model), all of it or a
    sample of about `train_bytes` taken from the whole of it (its first megabytes alone could be one book, or
    one language).

    The text is cut into slices of at most SUB_PIECE_CHARS, and slice i is kept when frac(i x golden
    ratio) < train_bytes / (the train split's bytes, counted in a first pass: which documents go to val is
    decided by a hash, so the split's size is known only by looking). That sequence spreads its hits evenly
    over any run of slices (no unlucky stretches, as a random draw has), whatever a slice's size or place in
    its document, so long documents and short, beginnings and ends, are sampled alike, and the same inputs
    always give the same tokenizer."""
    t0 = time.perf_counter()

    def train_pieces(desc: str) -> Iterator[str]:
        with _progress_bar(total, desc, progress) as bar:
            for side, piece, _ in _segments(keyed, text_field, mode, val_fraction, SUB_PIECE_CHARS):
                bar.update(len(piece))  # characters: close enough to bytes for a progress bar
                if side != VAL:
                    yield piece
            bar.update(max(0, bar.total - bar.n))

    share = 1.0
    if train_bytes is not None:
        split_bytes = sum(len(piece.encode("utf-8", errors="replace")) for piece in train_pieces("count train"))
        share = train_bytes / max(split_bytes, 1)
    counts = {"seen": 0, "kept": 0, "slices": 0}  # bytes: UTF-8 of the text (a JSONL text field, not the file)

    def texts() -> Iterator[str]:
        for piece in train_pieces("train bpe"):
            if share >= 1.0:
                yield piece
                continue
            # A piece without a safe cut can run to MAX_PIECE_CHARS: sample slices, not pieces.
            for i in range(0, len(piece), SUB_PIECE_CHARS):
                part = piece[i:i + SUB_PIECE_CHARS]
                n = len(part.encode("utf-8", errors="replace"))
                counts["seen"] += n
                counts["slices"] += 1
                if (counts["slices"] * GOLDEN_RATIO_FRACTION) % 1.0 < share:
                    counts["kept"] += n
                    yield part

    tok = BPETokenizer.train(texts(), vocab_size)
    on = "" if share >= 1.0 else \
        f": {counts['kept'] / 1e6:,.1f} MB of text sampled from all its {counts['seen'] / 1e6:,.1f} MB (the cap)"
    logger.info("trained a bpe tokenizer of %d tokens on the train split%s in %.1f s", tok.vocab_size, on,
                time.perf_counter() - t0)
    return tok


# ------------------------------------------------------------------------------------------ default corpus


# Here rather than in sources.py: it looks up default_corpus_files in this module, where tests replace it.
def _default_corpus_keyed() -> list[tuple[Path, str]]:
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    keyed = []
    for p in default_corpus_files():
        r = p.resolve()
        keyed.append((r, r.relative_to(root).as_posix() if r.is_relative_to(root) else r.name))
    return keyed


# ------------------------------------------------------------------------------------------ fingerprint


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _fingerprint(sources: list[dict], tok_request: dict, settings: dict) -> tuple[str, dict[str, str]]:
    parts = {"sources": _digest(sources), "tokenizer": _digest(tok_request), "settings": _digest(settings)}
    return _digest(parts), parts


def _why_rebuild(old: dict, sources: list[dict], tok_request: dict, settings: dict) -> list[str]:
    reasons = []
    old_src = {s["path"]: s for s in old.get("sources", [])}
    new_src = {s["path"]: s for s in sources}
    if old_src != new_src or [s["path"] for s in old.get("sources", [])] != [s["path"] for s in sources]:
        added = [p for p in new_src if p not in old_src]
        removed = [p for p in old_src if p not in new_src]
        modified = [p for p in new_src if p in old_src and old_src[p] != new_src[p]]
        detail = [f"{len(v)} {k} ({', '.join(Path(p).name for p in v[:3])}{', ...' if len(v) > 3 else ''})"
                  for k, v in (("added", added), ("removed", removed), ("modified", modified)) if v]
        reasons.append("sources changed: " + ("; ".join(detail) or "reordered"))
    if old.get("tokenizer_request") != tok_request:
        reasons.append(f"tokenizer changed: {old.get('tokenizer_request')} -> {tok_request}")
    old_settings = old.get("settings", {})
    for key in sorted(set(settings) | set(old_settings)):
        if old_settings.get(key) != settings.get(key):
            reasons.append(f"setting {key} changed: {old_settings.get(key)!r} -> {settings.get(key)!r}")
    return reasons or ["the fingerprint differs"]


# ----------------------------------------------------------------------------------------------- prepare


def _validate(tokenizer: str, tokenizer_file: str | Path | None, bpe_vocab_size: int, val_fraction: float,
              workers: int, shard_tokens: int, bpe_train_mb: float) -> None:
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"--tokenizer {tokenizer!r}: expected one of {', '.join(TOKENIZERS)}")
    if tokenizer == "byte" and tokenizer_file is not None:
        raise ConfigError(f"--tokenizer-file {tokenizer_file}: the byte tokenizer takes no file; "
                          "use it with --tokenizer gpt2 or bpe")
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction {val_fraction}: must lie strictly between 0 and 1 (e.g. 0.1)")
    if tokenizer == "bpe" and tokenizer_file is None and bpe_vocab_size < 258:
        raise ConfigError(f"--vocab-size {bpe_vocab_size}: a bpe vocabulary needs >= 258 tokens "
                          "(256 bytes, <|endoftext|> and at least one merge)")
    if isinstance(bpe_train_mb, bool) or not isinstance(bpe_train_mb, numbers.Real) or \
            not math.isfinite(bpe_train_mb) or bpe_train_mb < 0:
        raise ConfigError(f"--bpe-train-mb {bpe_train_mb}: must be a number >= 0 (0 = train on all of the train split)")
    if workers < 0:
        raise ConfigError(f"--workers {workers}: must be >= 0 (0 = all cores, 1 = no worker processes)")
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens {shard_tokens}: must be >= 1")


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def _bpe_train_bytes(bpe_train_mb: float, total_bytes: int) -> int | None:
    """How many bytes of text a bpe tokenizer trains on: None = all of it (the inputs are within the cap)."""
    if bpe_train_mb == 0:
        return None
    cap = max(1, math.ceil(bpe_train_mb * 1_000_000))
    return cap if cap < total_bytes else None


def _tokenizer_request(tokenizer: str, tokenizer_file: str | Path | None, bpe_vocab_size: int,
                       train_bytes: int | None = None) -> dict:
    """What decides the tokenizer before it exists (a bpe one is trained later, deterministically)."""
    req: dict[str, Any] = {"kind": tokenizer}
    if tokenizer_file is not None:
        p = Path(tokenizer_file)
        if not p.is_file():
            raise DataError(f"--tokenizer-file {str(tokenizer_file)!r} does not exist")
        req["file_sha256"] = file_sha256(p)
    elif tokenizer == "bpe":
        req["vocab_size"] = bpe_vocab_size
        if train_bytes is not None:  # only where it samples: inputs within the cap keep their fingerprint
            req["train_bytes"] = train_bytes
    return req


def prepare(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    tokenizer: str = "bpe",
    tokenizer_file: str | Path | None = None,
    bpe_vocab_size: int = DEFAULT_VOCAB_SIZE,
    val_fraction: float = 0.1,
    text_field: str = "text",
    extensions: Iterable[str] = (".txt", ".md"),
    workers: int = 0,
    progress: bool = True,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    bpe_train_mb: float = DEFAULT_BPE_TRAIN_MB,
) -> dict:
    """Tokenize `inputs` (none = the embedded default corpus) into shards + meta.json in `out`; return the meta.

    Reuses `out` when its fingerprint (sources, tokenizer, settings) matches and its files verify. A bpe
    tokenizer trains on all of the train split's text, or, with `bpe_train_mb` > 0 and inputs larger than that
    (MB = 10^6 bytes of the input files), on a sample of about that size drawn from all of it.
    """
    t_start = time.perf_counter()
    _validate(tokenizer, tokenizer_file, bpe_vocab_size, val_fraction, workers, shard_tokens, bpe_train_mb)
    if isinstance(inputs, (str, Path)):  # one path, not a sequence of characters
        inputs = [inputs]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file, not a directory; choose another --out")
    from gpttrain.checkpoint import folder_step, is_checkpoint_or_run

    if out.is_dir() and (is_checkpoint_or_run(out) or (out / "metrics.jsonl").is_file() or folder_step(out) is not None
                         or any(folder_step(c) is not None for c in out.iterdir() if c.is_dir())):  # checkpoints/
        raise DataError(f"--out {out}: is a training run's folder, its checkpoints/ or one of them; prepared data "
                        "goes in a directory of its own, e.g. data/NAME")
    exts = _normalize_extensions(extensions)
    # Inputs are checked for text only when they are read below: an up-to-date output skips reading them.
    keyed = _resolve_keyed(inputs, exts, check_text=False) if inputs else _default_corpus_keyed()
    paths = [p for p, _ in keyed]
    sources = _source_records(paths)
    total_bytes = sum(s["size"] for s in sources)
    train_bytes = _bpe_train_bytes(bpe_train_mb, total_bytes)
    tok_request = _tokenizer_request(tokenizer, tokenizer_file, bpe_vocab_size, train_bytes)
    trains_bpe = tokenizer == "bpe" and tokenizer_file is None  # a bpe tokenizer trained here (on the train split)
    settings = {"val_fraction": val_fraction, "text_field": text_field, "extensions": list(exts),
                "shard_tokens": shard_tokens, "format_version": FORMAT_VERSION}
    fingerprint, parts = _fingerprint(sources, tok_request, settings)

    if (out / META_NAME).is_file():
        try:
            old = load_meta(out)
        except DataError as e:
            logger.info("%s: rebuilding: %s", out, e)
        else:
            problem = verify_dir(out, old) if old.get("fingerprint") == fingerprint else None
            if old.get("fingerprint") == fingerprint and problem is None:
                logger.info("%s: up to date, reusing (%d train + %d val tokens)", out,
                            old["splits"]["train"]["tokens"], old["splits"]["val"]["tokens"])
                if trains_bpe and "tokenizer_trained_on" not in old:
                    # Kept as it is: runs and checkpoints on this dir stay valid (same tokenizer).
                    logger.info("%s: its bpe tokenizer was trained on both splits, by an earlier gpttrain (val "
                                "text is unseen by the tokenizers trained now); delete the folder to prepare it "
                                "anew", out)
                return old
            why = [problem] if problem else _why_rebuild(old, sources, tok_request, settings)
            logger.info("%s: rebuilding: %s", out, "; ".join(why))

    if inputs:
        for p in paths:
            check_text_file(p)

    mode = _choose_split_mode(paths, val_fraction)
    if tokenizer == "gpt2":
        tok: Tokenizer = GPT2Tokenizer(tokenizer_file)
    elif tokenizer == "byte":
        tok = ByteTokenizer()
    elif tokenizer_file is not None:
        tok = BPETokenizer.from_file(tokenizer_file)
    else:
        tok = _train_bpe(keyed, text_field, bpe_vocab_size, total_bytes, progress, mode, val_fraction, train_bytes)
    n_workers = workers or max(1, min(_default_workers(), total_bytes // AUTO_BYTES_PER_WORKER[tokenizer]))
    dtype = token_dtype(tok.vocab_size)

    tmp = make_temp_dir(out)
    writers = {side: ShardWriter(tmp, SPLITS[side], dtype, shard_tokens) for side in (TRAIN, VAL)}
    stats = {side: {"tokens": 0, "documents": 0, "eot_tokens": 0, "text_bytes": 0} for side in (TRAIN, VAL)}
    try:
        payload = payload_of(tok)
        tok_file = TOKENIZER_FILES[tok.kind] if payload is not None else None
        if tok_file is not None:
            data = payload.encode("utf-8") if tok.kind == "bpe" else base64.b64decode(payload)
            write_atomic(tmp / tok_file, data)
        elif tok.kind == "gpt2":
            logger.warning("gpt2 from tiktoken's cache: %s will need that cache; pass --tokenizer-file to "
                           "keep a copy of the ranks file beside the shards", out)

        t_encode = time.perf_counter()
        segments = _segments(keyed, text_field, mode, val_fraction, PIECE_CHARS)
        results = ordered_results(tok, make_tasks(segments, PIECE_CHARS), n_workers,
                                   None if tok_file is None else tmp / tok_file)
        # closing: on an error or Ctrl-C here the workers stop now, not when the generator is collected
        with closing(results), _progress_bar(total_bytes, "tokenize", progress) as bar:
            for result in results:
                for side, ids, nbytes, last in result:
                    writers[side].write(ids)
                    st = stats[side]
                    st["tokens"] += len(ids)
                    st["text_bytes"] += nbytes
                    st["documents"] += last  # one document side ends here, with its end-of-text token
                    st["eot_tokens"] += last
                    bar.update(nbytes)
                tokens = stats[TRAIN]["tokens"] + stats[VAL]["tokens"]
                bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t_encode, 1e-9):,.0f} tok/s", refresh=False)
            bar.update(max(0, bar.total - bar.n))  # JSONL files are larger than the text they hold
        seconds_encode = time.perf_counter() - t_encode
        names = {side: writers[side].close() for side in (TRAIN, VAL)}
        for side in (TRAIN, VAL):
            if stats[side]["tokens"] < 2:
                raise DataError(f"the {SPLITS[side]} split would hold {stats[side]['tokens']} tokens, each split "
                                f"needs at least 2: give more text or another --val-fraction (now {val_fraction})")
        meta = {
            "format_version": FORMAT_VERSION,
            "gpttrain_version": __version__,
            "created_unix": int(time.time()),
            "tokenizer": tok.spec(),
            "tokenizer_file": tok_file,
            "tokenizer_request": tok_request,
            **({"tokenizer_trained_on": "train split"} if trains_bpe else {}),
            "dtype": dtype.name,
            "default_corpus": not inputs,
            "sources": sources,
            "settings": settings,
            "fingerprint": fingerprint,
            "fingerprint_parts": parts,
            "split_mode": mode,
            "splits": {SPLITS[side]: {"shards": names[side], **stats[side]} for side in (TRAIN, VAL)},
            "total_text_bytes": stats[TRAIN]["text_bytes"] + stats[VAL]["text_bytes"],
            "total_tokens": stats[TRAIN]["tokens"] + stats[VAL]["tokens"],
        }
        install(tmp, out, meta)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        remove_tree(tmp)

    _log_summary(out, meta, mode, time.perf_counter() - t_start, seconds_encode)
    _warn_uneven_split(out, meta, mode, val_fraction)
    return meta


def _warn_uneven_split(out: Path, meta: dict, mode: str, val_fraction: float) -> None:
    """A document split's val share of the tokens far from --val-fraction (half or double of it) is said: documents
    go whole to the side a hash of each picks, so a few large ones can take most of the text to either side (and a
    bpe tokenizer trains on the train side alone)."""
    tokens = meta["total_tokens"]
    share = meta["splits"]["val"]["tokens"] / tokens if tokens else val_fraction
    if mode == "document" and not val_fraction / 2 <= share <= 2 * val_fraction:
        logger.warning("%s: val holds %.1f%% of the tokens, for --val-fraction %g: documents go whole to one side, "
                       "picked by a hash of each, and a few large ones decide the share; to split a large text by "
                       "position (its tail to val), prepare it in a set of fewer than %d documents", out,
                       100 * share, val_fraction, documents_for_a_document_split(val_fraction))


def _log_summary(out: Path, meta: dict, mode: str, seconds: float, seconds_encode: float) -> None:
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    mb = meta["total_text_bytes"] / 1e6
    tokens = meta["total_tokens"]
    def count(n: int, what: str) -> str:
        return f"{n} {what}{'' if n == 1 else 's'}"

    logger.info(
        "prepared %s (%s split): train %d tokens, %s, %s; val %d tokens (%.1f%%), %s, %s; %.2f MB in %.1f s "
        "(tokenizing %.1f s: %.1f MB/s, %.0f tokens/s)",
        out, mode, tr["tokens"], count(tr["documents"], "document"), count(len(tr["shards"]), "shard"), va["tokens"],
        100 * va["tokens"] / max(tokens, 1), count(va["documents"], "document"), count(len(va["shards"]), "shard"),
        mb, seconds, seconds_encode, mb / max(seconds_encode, 1e-9), tokens / max(seconds_encode, 1e-9),
    )


def open_tokenizer(data_dir: str | Path, meta: dict | None = None) -> Tokenizer:
    """Rebuild the tokenizer a data dir was prepared with, from the payload file beside its shards."""
    d = Path(data_dir)
    meta = meta if meta is not None else load_meta(d)
    spec = meta["tokenizer"]
    name = meta.get("tokenizer_file")
    if name is None:
        return from_spec(spec)
    path = d / name
    if not path.is_file():
        raise DataError(f"{path} is missing; prepare {d} again")
    if spec.get("kind") == "bpe":
        return from_spec(spec, path.read_text(encoding="utf-8"))
    tok = from_spec(spec, tokenizer_file=path)
    if spec.get("sha256") is not None and tok.spec().get("sha256") != spec["sha256"]:
        raise DataError(f"{path} is not the ranks file {d} was prepared with; prepare it again")
    return tok


# ------------------------------------------------------------------------------------------------ CLI


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `gpttrain prepare`."""
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="text files (any extension), directories (searched recursively for --ext files), "
                             "globs, or .jsonl files (one document per line); none = the embedded default "
                             "corpus, the Python standard library's own .py sources")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"directory for the shards and meta.json (default: {DEFAULT_OUT})")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="bpe",
                        help="gpt2 (tiktoken), bpe (trained on the inputs' train split) or byte (default: bpe)")
    parser.add_argument("--tokenizer-file", default=None, metavar="FILE",
                        help="gpt2: a gpt2.tiktoken ranks file (default: tiktoken's cache); bpe: a tokenizer.json "
                             "to use instead of training one (default: none, train)")
    parser.add_argument("--vocab-size", type=int, default=None, metavar="N",
                        help=f"vocabulary size of a trained bpe tokenizer, >= 258 (default: {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--bpe-train-mb", type=float, default=None, metavar="MB",
                        help="train the bpe tokenizer (on the train split) on a sample of about this many MB "
                             "drawn from all of that text, for a corpus larger than that (.jsonl: compared with "
                             "the files' size); "
                             f"0 = all of it (default: {DEFAULT_BPE_TRAIN_MB:g})")
    parser.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                        help="share of the text held out for validation, in (0, 1) (default: 0.1)")
    parser.add_argument("--text-field", default="text", metavar="NAME",
                        help="the field of each .jsonl line that holds the text (default: text)")
    parser.add_argument("--ext", default=".txt,.md", metavar="EXTS",
                        help="comma-separated extensions read from input directories (default: .txt,.md)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="tokenizer processes; 0 = all cores (fewer for a small input), 1 = in this process "
                             "(default: 0)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                        help=f"tokens per shard file at most (default: {DEFAULT_SHARD_TOKENS})")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar on stderr (default: shown where stderr is a terminal)")


def run_prepare(args: argparse.Namespace) -> int:
    """`gpttrain prepare`; returns the exit status. GpttrainError propagates for the CLI to print as one line."""
    bpe_only = [f"{flag} {value:g}" for flag, value in (("--vocab-size", args.vocab_size),
                                                        ("--bpe-train-mb", args.bpe_train_mb)) if value is not None]
    if bpe_only and not (args.tokenizer == "bpe" and args.tokenizer_file is None):
        logger.warning("%s: only a bpe tokenizer trained here takes %s; %s has its own vocabulary",
                       " and ".join(bpe_only), "them" if len(bpe_only) > 1 else "it",
                       args.tokenizer_file or f"the {args.tokenizer} tokenizer")
    try:
        prepare(
            args.inputs, args.out, tokenizer=args.tokenizer, tokenizer_file=args.tokenizer_file,
            bpe_vocab_size=DEFAULT_VOCAB_SIZE if args.vocab_size is None else args.vocab_size,
            val_fraction=args.val_fraction, text_field=args.text_field,
            extensions=[e for e in args.ext.split(",") if e.strip()], workers=args.workers,
            progress=not (args.no_progress or getattr(args, "quiet", False)), shard_tokens=args.shard_tokens,
            bpe_train_mb=DEFAULT_BPE_TRAIN_MB if args.bpe_train_mb is None else args.bpe_train_mb,
        )
    except OSError as e:  # unreadable input, full disk: one line naming the file rather than a traceback
        raise DataError(f"prepare: {e.filename}: {e.strerror}" if e.filename else f"prepare: {e}") from None
    return 0
