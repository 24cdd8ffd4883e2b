"""Sliding windows over a split's token shards; each rank takes its slice of every global batch.

Window i covers tokens [i * stride, i * stride + context_length + 1) of the split's stream (the
shards concatenated); x = window[:-1], y = window[1:]. The split holds
(N - (T + 1)) // stride + 1 windows.

Training order: per epoch, a permutation of the window indices seeded by (seed, epoch), or the
natural order without shuffle. Every step takes the next `micro_batch_size * world_size` entries
of that order (the global batch) and rank r keeps entries [r * B, (r + 1) * B). A final global
batch that would be incomplete is dropped and the next epoch starts. The cursor counts global
samples, so a run saved with one world size resumes at the same sample under another.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpttrain.data.shards import SPLITS, load_meta, read_shard
from gpttrain.errors import ConfigError, DataError

__all__ = ["TokenStream", "WindowLoader", "open_split", "read_shard"]

logger = logging.getLogger("gpttrain")


class TokenStream:
    """The concatenation of several shards, read without copying them into memory."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [Path(p) for p in paths]
        self._shards = [read_shard(p) for p in self.paths]
        # starts[i] = global position of shard i's first token; starts[-1] = total length.
        self._starts = np.zeros(len(self._shards) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in self._shards], out=self._starts[1:])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def get(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {len(self)}")
        out = np.empty(length, dtype=np.int64)
        # side="right" skips empty shards, whose start equals the next shard's.
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            shard = self._shards[i]
            offset = start + done - int(self._starts[i])
            n = min(length - done, len(shard) - offset)
            out[done:done + n] = shard[offset:offset + n]
            done += n
            i += 1
        return out


def open_split(data_dir: str | Path, split: str, meta: dict | None = None) -> TokenStream:
    """The token stream of one split of a prepared dir, checked against meta.json's count."""
    d = Path(data_dir)
    meta = meta if meta is not None else load_meta(d)
    if split not in meta["splits"]:
        raise DataError(f"{d} has no {split!r} split (it has {', '.join(meta['splits'])})")
    info = meta["splits"][split]
    stream = TokenStream([d / name for name in info["shards"]])
    if len(stream) != info["tokens"]:
        raise DataError(f"the {split} shards of {d} hold {len(stream)} tokens, meta.json says {info['tokens']}; "
                        "prepare the data again")
    return stream


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} {value!r}: must be an integer >= 1")
    return int(value)


class WindowLoader:
    """Batches of (x, y) windows for one rank, with a resumable cursor.

    `require_full_batch` (default: True for the train split, False otherwise): when the split holds fewer
    windows than one global batch, True raises at construction; False lets the loader be built for
    `eval_batches` (a small val split) and raises only if `next_batch` is called.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        *,
        context_length: int,
        stride: int | None = None,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
        require_full_batch: bool | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.split = split
        self.context_length = _positive("--model.context_length", context_length)
        self.stride = _positive("--data.stride", stride if stride is not None else context_length)
        self.micro_batch_size = _positive("--train.micro_batch_size", micro_batch_size)
        self.world_size = _positive("world size", world_size)
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank}: must lie in [0, {self.world_size}) for a world of {self.world_size}")
        if seed < 0:
            raise ConfigError(f"--train.seed {seed}: must be >= 0")
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.device = torch.device(device)
        self.meta = load_meta(self.data_dir)
        self.fingerprint = self.meta.get("fingerprint")
        self.stream = open_split(self.data_dir, split, self.meta)

        n, span = len(self.stream), self.context_length + 1
        if n < span:
            raise DataError(f"the {split} split of {self.data_dir} holds {n} tokens: fewer than one window of "
                            f"context_length+1 = {span}; lower --model.context_length or give more text")
        self.num_windows = (n - span) // self.stride + 1
        if require_full_batch is None:
            require_full_batch = split == SPLITS[0]
        self._too_few = None
        if self.num_windows < self.global_batch_size:
            self._too_few = (
                f"the {split} split of {self.data_dir} holds {self.num_windows} windows of {span} tokens at stride "
                f"{self.stride}, fewer than one global batch of micro_batch_size {self.micro_batch_size} x world "
                f"size {self.world_size} = {self.global_batch_size}; lower --train.micro_batch_size, "
                "--model.context_length or --data.stride, or give more text"
            )
            if require_full_batch:
                raise DataError(self._too_few)
        self.epoch = 0
        self.index = 0  # global samples of this epoch's order already handed out (all ranks together)
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    # ---- sizes and progress -----------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def windows_per_epoch(self) -> int:
        return self.num_windows

    @property
    def batches_per_epoch(self) -> int:
        """Global batches (= next_batch calls per rank) in one epoch; the incomplete last one is dropped."""
        return self.num_windows // self.global_batch_size

    @property
    def tokens(self) -> int:
        return len(self.stream)

    @property
    def progress(self) -> float:
        """Epochs done, as a float: epoch + index / windows."""
        return self.epoch + self.index / self.num_windows

    @property
    def batches_done(self) -> int:
        """Global batches of this loader's size behind the cursor, whole epochs included. A cursor saved at another
        global batch (a resume on another number of ranks) can stand mid-batch: that batch counts as still to do."""
        in_epoch = self.batches_per_epoch - (self.num_windows - self.index) // self.global_batch_size
        return self.epoch * self.batches_per_epoch + in_epoch

    # ---- training batches -------------------------------------------------------------------

    def _window_ids(self, lo: int, hi: int) -> np.ndarray:
        """Entries [lo, hi) of this epoch's order."""
        if not self.shuffle:
            return np.arange(lo, hi, dtype=np.int64)
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(self.num_windows)
            self._order_epoch = self.epoch
        return self._order[lo:hi]

    def _maybe_next_epoch(self) -> None:
        if self.index + self.global_batch_size > self.num_windows:
            self.epoch += 1
            self.index = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (micro_batch_size, context_length) int64, for this rank; advances the cursor.

        The epoch advances as soon as the remaining windows cannot fill a global batch, so after the
        last batch of an epoch `epoch` already names the next one and `index` is 0.
        """
        if self._too_few is not None:
            raise DataError(self._too_few)
        self._maybe_next_epoch()  # a resumed cursor may come from a run with a smaller global batch
        lo = self.index + self.rank * self.micro_batch_size
        ids = self._window_ids(lo, lo + self.micro_batch_size)
        self.index += self.global_batch_size
        self._maybe_next_epoch()
        return self._batch(ids)

    def _batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.context_length + 1
        windows = np.stack([self.stream.get(int(i) * self.stride, span) for i in window_ids])  # (b, T+1)
        x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))  # (b, T)
        y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))  # (b, T), x shifted by one
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with compute on the default stream.
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        if self.device.type != "cpu":
            return x.to(self.device), y.to(self.device)
        return x, y

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_windows": self.num_windows,
                "shuffle": self.shuffle, "split": self.split, "context_length": self.context_length,
                "stride": self.stride, "fingerprint": self.fingerprint}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue at the saved global sample; the seed comes from the state so the order is the same."""
        saved = {k: sd.get(k) for k in ("context_length", "stride")}  # (absent from older checkpoints)
        if any(v is not None and int(v) != getattr(self, k) for k, v in saved.items()):
            # The same number of windows can be cut another way: the cursor would point at other samples.
            raise DataError(
                f"the saved data cursor is for windows of {saved['context_length']} tokens at stride "
                f"{saved['stride']}, this run cuts {self.context_length} at stride {self.stride}; resume with "
                f"--data.stride {saved['stride']}, or start a new run to train on other windows"
            )
        if int(sd["num_windows"]) != self.num_windows:
            raise DataError(
                f"the saved data cursor counts {sd['num_windows']} windows, the {self.split} split of "
                f"{self.data_dir} holds {self.num_windows} (context length {self.context_length}, stride "
                f"{self.stride}); resume with the same data, context length and stride"
            )
        epoch, index = int(sd["epoch"]), int(sd["index"])
        if epoch < 0 or not 0 <= index <= self.num_windows:
            raise DataError(f"the saved data cursor (epoch {epoch}, index {index}) is out of range for "
                            f"{self.num_windows} windows")
        if sd.get("fingerprint") not in (None, self.fingerprint):
            logger.warning("%s was prepared again since this checkpoint (fingerprint differs); resuming anyway, "
                           "with the same number of windows", self.data_dir)
        self.seed = int(sd.get("seed", self.seed))
        self.shuffle = bool(sd.get("shuffle", self.shuffle))
        self.epoch, self.index = epoch, index
        self._order_epoch = -1

    # ---- evaluation -----------------------------------------------------------------------------

    def eval_window_ids(self, num_batches: int) -> np.ndarray:
        """The global eval set: num_batches * global batch windows spread evenly over the split (or all)."""
        want = _positive("--train.eval_batches", num_batches) * self.global_batch_size
        if want >= self.num_windows:
            return np.arange(self.num_windows, dtype=np.int64)
        return (np.arange(want, dtype=np.int64) * self.num_windows) // want  # spacing > 1: no repeats

    def _eval_rank_ids(self, num_batches: int) -> Iterator[np.ndarray]:
        ids = self.eval_window_ids(num_batches)
        g, b = self.global_batch_size, self.micro_batch_size
        for start in range(0, len(ids), g):
            mine = ids[start:start + g][self.rank * b:(self.rank + 1) * b]  # this rank's slice, as in training
            if len(mine):
                yield mine

    def eval_count(self, num_batches: int) -> int:
        """Windows this rank evaluates in `eval_batches(num_batches)` (may be 0 on a small split)."""
        return sum(len(ids) for ids in self._eval_rank_ids(num_batches))

    def eval_global_batches(self, num_batches: int) -> int:
        """Global eval batches: the same on every rank, though a rank may have no windows in the last ones."""
        return -(-len(self.eval_window_ids(num_batches)) // self.global_batch_size)

    def eval_batches(self, num_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (x, y) eval batches, non-empty only; the training cursor is not touched.

        Global batch j holds eval windows [j * B * world, (j + 1) * B * world); rank r takes entries
        [r * B, (r + 1) * B) of it. The last global batch may be short, so its batches are smaller or
        absent on some ranks: weight each batch's mean loss by x.shape[0] and sum over ranks.
        """
        for ids in self._eval_rank_ids(num_batches):
            yield self._batch(ids)
