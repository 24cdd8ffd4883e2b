"""Tokenizing in a process pool: tasks of text pieces in, token arrays out, in order and in bounded memory.

`make_tasks` groups the pieces into tasks of about a given size; `ordered_results` encodes them in worker
processes (spawned; each rebuilds the tokenizer once) with at most two tasks per worker in flight, and stops the
pool at once, without a hang or a worker's traceback, on Ctrl-C, an error or an early close (`_stop_pool`).
`gpttrain.data.prepare` writes what comes back into shards.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from gpttrain.data.shards import token_dtype
from gpttrain.data.sources import _cut_pieces
from gpttrain.errors import DataError
from gpttrain.tokenizer import Tokenizer, from_spec

SUB_PIECE_CHARS = 1 << 16  # HF tokenizers encode long strings slowly; bpe training buffers 256 of these


class Encoder:
    """Turns a task [(split, text, ends_doc), ...] into [(split, tokens, text bytes, ends_doc), ...]."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.dtype = token_dtype(tok.vocab_size)
        self.eot = tok.eot_id

    def _ids(self, text: str, data: bytes) -> np.ndarray:
        """The ids of `text`; `data` is its UTF-8 bytes."""
        if self.tok.kind == "byte":  # same ids as ByteTokenizer.encode, without a Python list per byte
            return np.frombuffer(data, dtype=np.uint8).astype(self.dtype)
        if self.tok.kind == "bpe" and len(text) > SUB_PIECE_CHARS:
            subs = [p for p, _ in _cut_pieces([text], SUB_PIECE_CHARS)]
            return np.fromiter(itertools.chain.from_iterable(self.tok.encode_batch(subs)), dtype=self.dtype)
        return np.array(self.tok.encode(text), dtype=self.dtype)

    def __call__(self, task: list[tuple[int, str, bool]]) -> list[tuple[int, np.ndarray, int, bool]]:
        out = []
        for side, text, last in task:
            data = text.encode("utf-8")
            ids = self._ids(text, data)
            if last:
                ids = np.append(ids, np.asarray(self.eot, dtype=self.dtype))
            out.append((side, ids, len(data), last))
        return out


_worker_encoder: Encoder | None = None


def _init_worker(spec: dict[str, Any], tokenizer_file: str | None) -> None:
    # Ctrl-C is the parent's to handle: it stops the pool (see _stop_pool). A worker starts with SIGINT blocked
    # (_sigint_held around its start), so a Ctrl-C to the process group during its start-up (imports) stays
    # pending; ignored from here, then unblocked: a pending one is dropped.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # One thread per worker process: the pool is the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_encoder
    _worker_encoder = Encoder(from_spec(spec, tokenizer_file=tokenizer_file))


def _encode_in_worker(task: list[tuple[int, str, bool]]) -> list[tuple[int, np.ndarray, int, bool]]:
    assert _worker_encoder is not None
    return _worker_encoder(task)


def make_tasks(segments: Iterable[tuple[int, str, bool]], target: int) -> Iterator[list]:
    """Small documents travel together so each task carries about `target` characters."""
    task: list = []
    chars = 0
    for seg in segments:
        if task and chars + len(seg[1]) > target:
            yield task
            task, chars = [], 0
        task.append(seg)
        chars += len(seg[1])
    if task:
        yield task


@contextmanager
def _sigint_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) held back while the block runs, and raised (as KeyboardInterrupt) at its end.

    Blocked in this thread as well, where the platform can: a process started here (a spawned worker) begins
    with SIGINT blocked, so a Ctrl-C to the process group cannot end it with a traceback in the middle of its
    imports, before its initializer ignores SIGINT. Held rather than ignored: a Ctrl-C that comes meanwhile is
    not lost, and a KeyboardInterrupt cannot land inside the pool's bookkeeping (a worker started but not
    recorded, a lock half taken).
    """
    caught: list[int] = []
    old = None
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        old = signal.getsignal(signal.SIGINT)
        if old is not None:  # None: a handler set outside Python, which could not be put back
            signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    mask = None
    try:
        if hasattr(signal, "pthread_sigmask"):
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending SIGINT is handled (recorded) here
        if old is not None:
            signal.signal(signal.SIGINT, old)
            if caught:  # again, to the handler put back: Python's default raises KeyboardInterrupt
                signal.raise_signal(signal.SIGINT)


def _stop_pool(pool: Any) -> None:
    """Stop a ProcessPoolExecutor now, its pending and running tasks unwanted (Ctrl-C, an error, a consumer
    that stopped reading), without waiting on anything that may never come.

    A plain shutdown waits for the running tasks (seconds each), and can wait for good: the pool's queue
    feeder thread blocks writing a task (up to a MB) into a pipe nobody reads once the workers are gone, and
    multiprocessing joins that thread at exit; the pool's manager thread blocks reading a result a killed
    worker left half written. Here: shut down without waiting, cancelling what has not started (the pool's
    own cancel; a future cancelled by hand beforehand made its manager thread fail with InvalidStateError when
    a worker died), tell the call queue not to join its feeder thread, end the workers, close this process's
    copy of the result pipe's write end (so a half-read result ends in EOF, not a wait), then let the manager
    thread finish. Uses the pool's internals (named so since Python 3.9), each looked up with a default.
    """
    with _sigint_held():  # a second Ctrl-C meanwhile is raised once this is done
        processes = list((getattr(pool, "_processes", None) or {}).values())
        call_queue = getattr(pool, "_call_queue", None)
        result_queue = getattr(pool, "_result_queue", None)
        manager = getattr(pool, "_executor_manager_thread", None)
        pool.shutdown(wait=False, cancel_futures=True)  # first: the manager cancels before it sees workers die
        if call_queue is not None:
            call_queue.cancel_join_thread()
        for p in processes:
            p.terminate()
        deadline = time.monotonic() + 5
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join(5)
        writer = getattr(result_queue, "_writer", None)
        if writer is not None:
            writer.close()
        if manager is not None:
            manager.join(10)


def ordered_results(tok: Tokenizer, tasks: Iterator[list], workers: int,
                     tokenizer_file: Path | None = None) -> Iterator[list]:
    """Encode tasks in order; at most 2 * workers tasks are in flight, so memory stays bounded.

    Pool.imap would read the whole task iterator ahead (all the corpus text at once); a window of
    futures keeps the same order with backpressure. A ProcessPoolExecutor (not a Pool) fails fast when
    a worker dies, where a Pool would start replacements forever. Workers rebuild the tokenizer from
    `tokenizer_file` (the one written beside the shards), not from its payload passed inline: MBs for gpt2
    would go down each worker's start-up pipe, and spawn blocks on that write for good when the worker dies
    before reading it (a script without a main guard), a hang instead of the error below.

    Ctrl-C: workers start with SIGINT blocked and then ignore it (they would die with a traceback each);
    here, a KeyboardInterrupt (or any exception, or the consumer closing this generator) stops the pool at
    once (_stop_pool) and goes on up. Close this generator when stopping early, not leave it to the garbage
    collector: the pool stops then.
    """
    if workers == 1:
        encoder = Encoder(tok)
        yield from map(encoder, tasks)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn: the parent may hold threads (HF tokenizers after training, torch), which fork does not copy safely.
    ctx = mp.get_context("spawn")
    path = None if tokenizer_file is None else str(tokenizer_file)
    with _sigint_held():
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tok.spec(), path))
    stopped = False
    try:
        window: deque = deque()
        for task in tasks:
            with _sigint_held():  # submit starts the workers, the first `workers` times
                window.append(pool.submit(_encode_in_worker, task))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
        pool.shutdown(wait=True)  # all done, the workers idle: they exit at once
        stopped = True
    except BrokenProcessPool:
        raise DataError(
            "a tokenizer worker process died before finishing (out of memory, killed, or a script that calls "
            "prepare() without an `if __name__ == \"__main__\":` guard, which spawned workers re-run); "
            "fix that or pass workers=1 (--workers 1)"
        ) from None
    finally:
        if not stopped:
            _stop_pool(pool)
