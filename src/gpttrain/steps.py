"""The training loop's bookkeeping: one step's numbers read back without stalling the device (StepStats,
read_steps), the counters of a step logged later (StepMark), where a process's wall time goes (LoopClock), and
the stop signal every rank acts on at the same step (StopFlag). The trainer owns the loop; this is its ledger.
"""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import dataclass, field
from typing import Any

import torch

from gpttrain.metrics import eval_time_share


@dataclass
class LoopClock:
    """Where one process's training loop spends its wall time (perf_counter seconds): the summary at its end
    and the evaluation-share hint read it. Steps are timed by the trainer's train_time; the rest is here."""

    start: float
    train_at_start: float  # the run's train_time (resumes add up) when this process's loop began
    steps_at_start: int  # and its timed_steps
    tokens_at_start: int = 0  # and their tokens
    first_step: float = 0.0  # this process's first step: compile, warm-up
    evals: list[dict[str, float]] = field(default_factory=list)  # each evaluation's seconds: losses, sample
    samples: float = 0.0  # samples by epochs (--log.sample_every_epochs), not counted in the evaluations
    plots: float = 0.0  # loss-plot drawings
    checkpoints: float = 0.0
    hinted: bool = False

    def cadence(self, train_time: float, timed_steps: int) -> tuple[dict[str, float], float] | None:
        """(mean seconds of an evaluation's parts, mean seconds of a step). The process's first evaluation is
        left out (it may compile or warm caches, as its first step does); None until there is a later one and
        a timed step."""
        steps = timed_steps - self.steps_at_start
        if len(self.evals) < 2 or steps <= 0:
            return None
        later = self.evals[1:]
        return {k: sum(e[k] for e in later) / len(later) for k in later[0]}, (train_time - self.train_at_start) / steps

    def eval_share(self, train_time: float, timed_steps: int, eval_every: int) -> float | None:
        """Evaluation's share of the time at this cadence: a mean evaluation over itself plus eval_every mean
        steps."""
        mean = self.cadence(train_time, timed_steps)
        return None if mean is None else eval_time_share(sum(mean[0].values()), mean[1], eval_every)

    def split(self, now: float, train_time: float, timed_steps: int, eval_every: int) -> dict[str, Any]:
        """Seconds by kind from the loop's start to `now` (the loop's perf_counter); `other` is mostly logging
        (the reads of the steps' numbers, which wait for the device, count as steps)."""
        wall = now - self.start
        train = train_time - self.train_at_start
        evaluation = sum(sum(e.values()) for e in self.evals)
        other = max(wall - self.first_step - train - evaluation - self.samples - self.plots - self.checkpoints, 0.0)
        after_first = wall - self.first_step
        return {"wall_s": wall, "first_step_s": self.first_step, "train_s": train, "eval_s": evaluation,
                "sample_s": self.samples, "plot_s": self.plots, "checkpoint_s": self.checkpoints, "other_s": other,
                "timed_steps": timed_steps - self.steps_at_start, "evals": len(self.evals),
                # the loop's time besides its steps, over all of it but the first step
                "bookkeeping_share": (after_first - train) / after_first if after_first > 0 else None,
                "eval_share": self.eval_share(train_time, timed_steps, eval_every)}


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop all-reduces it so every rank stops at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. inside a test runner thread)
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StepStats:
    """One optimizer step's numbers, left on the device. Reading one waits for the device (a host sync), so
    the loop reads them in batches through `read_steps`, never inside a step: a log step's once the next step
    is queued (on CUDA; at once elsewhere, see Trainer.read_late), those of evaluation, checkpoint, sample,
    first and last steps at once.

    On CUDA the numbers are copied to pinned host memory as soon as the step's kernels have computed them,
    and an event marks that copy: a read waits for this step's work only, not for what was queued after it
    (a plain `.tolist()` would wait for the whole stream). So the loop can read a step once the next one is
    queued, and the device never runs dry while the host logs."""

    def __init__(self, packed: torch.Tensor, world_size: int, scaler_enabled: bool):
        # [loss summed over ranks, stop votes, bad-gradient votes, grad norm summed over ranks, then on CUDA one
        # slot per rank: its peak GiB of memory as the step was queued]
        self.packed = packed
        self._world = world_size
        self._scaler = scaler_enabled
        self._values: list[float] | None = None
        self._ready: torch.cuda.Event | None = None
        if packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(packed.device))  # the stream the copy was queued on

    @property
    def values(self) -> list[float]:
        if self._values is None:
            if self._ready is not None:
                self._ready.synchronize()
                self._values = self._host.tolist()
            else:
                self._values = self.packed.tolist()
        return self._values

    @property
    def loss(self) -> float:
        return self.values[0] / self._world

    @property
    def grad_norm(self) -> float:
        return self.values[3] / self._world  # the global norm, the same on every rank

    @property
    def stop(self) -> bool:
        return self.values[1] > 0

    @property
    def mem_peak_gib(self) -> float | None:
        """The worst rank's peak CUDA memory up to this step (None off CUDA): the one that runs out first."""
        return max(self.values[4:], default=None)

    @property
    def finite(self) -> bool:
        # With fp16 an overflowing gradient is routine: the scaler skips that step and lowers its scale.
        return math.isfinite(self.loss) and (self.values[2] == 0 or self._scaler)


@dataclass
class StepMark:
    """A step's counters as the loop left them, for a record written once its numbers are read."""

    step: int
    epoch: float
    tokens: int
    lr: float
    steps: int  # how many queued steps, up to and including this one, the read takes


def read_steps(stats: list[StepStats]) -> None:
    """Bring the numbers of several steps to the host with one wait, for the last of them (the device runs
    its stream in order, so the earlier ones are there by then)."""
    todo = [s for s in stats if s._values is None]
    if todo and todo[-1]._ready is not None:
        todo[-1]._ready.synchronize()
        for s in todo:
            s._values = s._host.tolist()
    elif todo:
        for s, row in zip(todo, torch.stack([s.packed for s in todo]).tolist()):
            s._values = row
