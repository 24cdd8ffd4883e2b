"""Rank-0 reporting: console lines or a tqdm bar, train.log, metrics.jsonl, TensorBoard, W&B.

Other ranks get a Monitor that writes nothing, so the training loop calls it unconditionally.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gpttrain.memory import GIB

log = logging.getLogger("gpttrain")


class _TqdmHandler(logging.Handler):
    """Console logging that does not tear a live progress bar apart."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stdout)


def setup_logging(is_main: bool, quiet: bool = False) -> None:
    """Rank 0 logs INFO; other ranks only warnings (so N ranks don't print N times). Where the output
    goes is the application's choice (the CLI sends it to stdout); a library caller keeps its own."""
    log.setLevel(logging.INFO if is_main and not quiet else logging.WARNING)


@contextlib.contextmanager
def logging_levels(is_main: bool, quiet: bool = False) -> Iterator[None]:
    """`setup_logging` for the block; afterwards the logger's level is what it was before (an API caller's, a
    test's)."""
    saved = log.level
    setup_logging(is_main, quiet)
    try:
        yield
    finally:
        log.setLevel(saved)


def _last_resort(record: logging.LogRecord) -> None:
    """What Python does with a record no handler takes (stderr, warnings and up), for our run-time handlers:
    they would otherwise count as takers and silence it. Only where the root logger has no handler and the
    gpttrain logger none but ours."""
    last = logging.lastResort
    if (last is not None and record.levelno >= last.level and not logging.getLogger().handlers
            and all(isinstance(h, (_Onward, _Early)) for h in log.handlers)):
        last.handle(record)


class _Onward(logging.Handler):
    """Under `run_logging(quiet=True)`: the gpttrain logger does not propagate, and this hands its warnings
    and errors on to the root logger's handlers (the console); info lines reach only the logger's own
    handlers, a run's train.log. As propagation would: each root handler at its own level, and logging's
    last resort where no handler at all would take the record."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        for h in logging.getLogger().handlers:
            if record.levelno >= h.level:
                h.handle(record)
        _last_resort(record)


class _Early(logging.Handler):
    """A run's lines from before its train.log opens (data preparation, the resolved config; at most `keep`),
    for that file. Outside a quiet run it also gives a warning that nothing else shows to the last resort, as
    Python would without this handler (in a quiet run `_Onward` does)."""

    def __init__(self, keep: int = 10_000) -> None:
        super().__init__()
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if _onward is None:
            _last_resort(record)


_onward: _Onward | None = None  # set while a quiet run is logging
_early: _Early | None = None  # set on rank 0 from a run's start until its train.log opens


def _write_early_lines(fh: logging.Handler) -> None:
    """Hand the lines logged before train.log opened to it, once, and stop keeping them."""
    global _early
    early, _early = _early, None
    if early is not None:
        log.removeHandler(early)
        for record in early.records:
            fh.handle(record)
        early.records.clear()


def console_shows_info() -> bool:
    """Whether the gpttrain logger's info lines reach the console (not under -q): progress bars follow it."""
    return _onward is None and log.isEnabledFor(logging.INFO)


@contextlib.contextmanager
def run_logging(is_main: bool, quiet: bool) -> Iterator[None]:
    """A training run's logging (`setup_logging`'s levels). Quiet (`gpttrain train -q`): only warnings and
    errors reach the console, while the run's train.log keeps its info lines too. On rank 0 the lines logged
    before train.log opens (data preparation, the resolved config) are kept and written to it first; a run
    that ends before it opens drops them. The logger is restored on exit."""
    global _onward, _early
    with logging_levels(is_main):
        propagate = log.propagate
        onward = _Onward() if quiet else None
        early = _Early() if is_main else None
        for h in (onward, early):
            if h is not None:
                log.addHandler(h)
        if onward is not None:
            log.propagate = False
        _onward, _early = onward, early
        try:
            yield
        finally:
            for h in (early, onward):  # these objects, whatever the globals hold by now
                if h is not None:
                    log.removeHandler(h)
            if _early is early:
                _early = None
            if _onward is onward:
                _onward = None
            log.propagate = propagate


def memory_stats(device: torch.device) -> dict[str, float | None]:
    """Allocated / reserved / peak GiB of this process's CUDA device (None on CPU)."""
    if device.type != "cuda":
        return {"mem_alloc_gib": None, "mem_reserved_gib": None, "mem_peak_gib": None}
    g = GIB
    return {
        "mem_alloc_gib": torch.cuda.memory_allocated(device) / g,
        "mem_reserved_gib": torch.cuda.memory_reserved(device) / g,
        "mem_peak_gib": torch.cuda.max_memory_allocated(device) / g,
    }


_nvml_failed = False  # once NVML has failed in this process, later log steps do not pay for trying again


def gpu_utilization(device: torch.device) -> float | None:
    """GPU utilization in percent through NVML where available, else None."""
    global _nvml_failed
    if device.type != "cuda" or _nvml_failed:
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # pynvml missing or NVML unavailable: omit, never invent
        _nvml_failed = True
        return None


def _ends_mid_line(path: Path) -> bool:
    """Whether `path` exists and its last byte is not a newline."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() == 0:
                return False
            f.seek(-1, 2)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


class Monitor:
    def __init__(self, run_dir: Path, *, is_main: bool, total_steps: int, progress: str = "auto",
                 tensorboard: bool = False, wandb: bool = False, config: dict | None = None,
                 initial_step: int = 0):
        self.is_main = is_main
        self.run_dir = run_dir
        self._bar = None
        self._tb = None
        self._wandb = None
        self._file_handler = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = run_dir / "metrics.jsonl"
        torn = _ends_mid_line(metrics)
        self._metrics = open(metrics, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if torn:  # a run killed mid-write left half a line: this run's first record must not be glued onto it
            self._metrics.write("\n")
        fh = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)
        self._file_handler = fh
        _write_early_lines(fh)
        # -q (a quiet run): no bar unless asked for by name, as no data-preparation bars either.
        use_bar = progress == "bar" or (progress == "auto" and sys.stdout.isatty() and _onward is None)
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             file=sys.stdout)
            # While the bar lives, console lines go through tqdm.write instead of the usual handlers (a quiet
            # run's warnings too: they are not also handed on to the root logger's).
            th = _TqdmHandler(logging.WARNING if _onward is not None else logging.NOTSET)
            th.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(th)
            self._tqdm_handler = th
            self._propagate = log.propagate
            log.propagate = False
            self._onward = _onward
            if _onward is not None:
                log.removeHandler(_onward)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("--log.tensorboard: tensorboard is not installed (pip install 'gpttrain[tensorboard]'); "
                            "continuing without it")
            else:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_mod
            except ImportError:
                log.warning("--log.wandb: wandb is not installed; continuing without it")
            else:
                self._wandb = wandb_mod.init(dir=str(run_dir), config=config, resume="allow")

    def record(self, rec: dict[str, Any]) -> None:
        """One metrics.jsonl line (plus TensorBoard / W&B scalars)."""
        if not self.is_main:
            return
        # Strict JSON: a non-finite number (a NaN loss) is written as null, its key listed under "nonfinite".
        bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            rec = {**{k: (None if k in bad else v) for k, v in rec.items()}, "nonfinite": bad}
        self._metrics.write(json.dumps(rec, allow_nan=False) + "\n")
        self._metrics.flush()
        step = rec.get("step", 0)
        scalars = {f"{rec['kind']}/{k}": v for k, v in rec.items()
                   if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def advance(self, steps: int, postfix: dict[str, str] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    @property
    def uses_bar(self) -> bool:
        return self._bar is not None

    def close(self) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.close()
            log.removeHandler(self._tqdm_handler)
            if self._onward is None or self._onward is _onward:  # not where the quiet run's logging has ended
                log.propagate = self._propagate
                if self._onward is not None:  # the quiet run goes on after the bar
                    log.addHandler(self._onward)
        if self._file_handler is not None:
            log.removeHandler(self._file_handler)
            self._file_handler.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._metrics.close()
