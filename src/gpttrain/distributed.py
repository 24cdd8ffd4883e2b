"""Who am I (rank, local rank, world, device), backend choice, init/teardown, reductions.

The world comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); plain
`gpttrain train` is one process and never initialises a process group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gpttrain.errors import ConfigError, GpttrainError, rank_local


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: one process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment, (0, 0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_device(requested: str, local_rank: int = 0, flag: bool = True) -> torch.device:
    """The device this process trains on; refuses CUDA/MPS where there is none, and a name that is no device.
    `cuda:N` (the Python API's `gpttrain.load`) names one GPU itself; plain `cuda` takes LOCAL_RANK's. A
    refusal names `--device` (the commands), or with `flag` False the Python keyword `device=`."""

    def said(name) -> str:  # the message's start: the setting and its value
        return f"--device: {name}" if flag else f"device={name!r}"

    cpu = "--device cpu" if flag else "device='cpu'"

    def no_cuda(name: str) -> ConfigError:
        return ConfigError(f"{said(name)} was asked for but torch sees no CUDA GPU (torch {torch.__version__}, CUDA "
                           f"build: {torch.version.cuda is not None}); use {cpu} or install a CUDA build of torch")

    if requested not in ("auto", "cpu", "cuda", "mps"):
        try:
            dev = torch.device(requested)
        except (RuntimeError, ValueError, TypeError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda", "mps") or (dev.type != "cuda" and dev.index not in (None, 0)):
            raise ConfigError(f"{said(repr(requested) if flag else requested)} is not a device gpttrain runs on; "
                              "use auto, cpu, cuda, cuda:N or mps")
        if dev.index is None or dev.type != "cuda":  # cpu:0 and mps:0 are the one cpu and mps
            requested = dev.type
        else:
            if not torch.cuda.is_available():
                raise no_cuda(requested)
            if dev.index >= torch.cuda.device_count():
                raise ConfigError(f"{said(requested)} does not exist (this machine has "
                                  f"{torch.cuda.device_count()} GPU(s): cuda:0..)")
            return dev
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise no_cuda("cuda")
        n = torch.cuda.device_count()
        if local_rank >= n:
            # Before the process group exists, and rank 0 (LOCAL_RANK 0) never meets it: said by the ranks that do.
            raise rank_local(ConfigError(f"--device: LOCAL_RANK {local_rank} has no GPU (this machine has {n}); "
                                         f"start at most {n} processes per node (torchrun --nproc_per_node {n})"))
        return torch.device("cuda", local_rank)
    if requested == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{said('mps')} was asked for but this machine has no Apple GPU; use {cpu}")
        return torch.device("mps")
    return torch.device("cpu")


def choose_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested == "nccl" and device.type != "cuda":
            raise ConfigError("--dist.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
        return requested
    if device.type == "cuda" and sys.platform != "win32":
        return "nccl"
    return "gloo"


def init(device_request: str = "auto", backend_request: str = "auto", timeout_s: int = 1800) -> DistInfo:
    rank, local_rank, world = env_world()
    device = resolve_device(device_request, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return DistInfo(0, 0, 1, device, None)
    backend = choose_backend(backend_request, device)
    if sys.platform == "win32":
        os.environ.setdefault("USE_LIBUV", "0")  # Windows' gloo TCP store lacks libuv
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device_request: str = "auto", backend_request: str = "auto", timeout_s: int = 1800) -> Iterator[DistInfo]:
    """Initialise the world and tear the process group down on every exit path."""
    try:
        info = init(device_request, backend_request, timeout_s)
        yield info
        # On a normal exit, wait for every rank first: rank 0 hosts the rendezvous store, and a rank still
        # talking to it when it goes away can abort ("terminate called without an active exception").
        barrier(info)
    finally:
        teardown()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce(t: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of `t` ("sum" or "max"); a no-op on one process."""
    if not info.distributed:
        return t
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], Any], info: DistInfo) -> Any:
    """`fn()` run on rank 0 alone, its result on every rank. A GpttrainError it raises is raised on every rank,
    so the others neither wait at the next collective for a rank that failed nor go on without it."""
    outcome: tuple[bool, Any] = (True, None)
    if info.is_main:
        try:
            outcome = (True, fn())
        except GpttrainError as e:
            outcome = (False, e)
    ok, value = broadcast_object(outcome, info)
    if not ok:
        raise value
    return value


def gather_failures(failure: str | None, info: DistInfo) -> str | None:
    """This rank's failure (a message; None: it did not fail) -> one verdict, the same on every rank (collective):
    None where no rank failed; the failing ranks' message where they all said the same and rank 0 is one of them;
    else each distinct message after the first rank that said it (`rank 1: ...`), so rank 0 can say what a rank
    met alone."""
    if not info.distributed:
        return failure
    said: list[str | None] = [None] * info.world_size
    dist.all_gather_object(said, failure)
    failed = {r: m for r, m in enumerate(said) if m is not None}
    distinct = list(dict.fromkeys(failed.values()))
    if not failed or (len(distinct) == 1 and 0 in failed):
        return distinct[0] if failed else None
    parts = []
    for m in distinct[:3]:
        ranks = [r for r, mr in failed.items() if mr == m]
        parts.append(f"rank {ranks[0]}{f' (and {len(ranks) - 1} more)' if len(ranks) > 1 else ''}: {m}")
    return "; ".join(parts) + (f"; and {len(distinct) - 3} other errors" if len(distinct) > 3 else "")


def on_every(fn: Callable[[], Any], info: DistInfo) -> Any:
    """`fn()` run on every rank, each its own result; `fn` must run no collective. An error raised on any rank is
    raised on every rank, as one verdict (`gather_failures`), which rank 0 prints: a rank that failed alone (a file
    it cannot read, a shard of its own) is named there, and no rank goes on to a collective that a failed rank never
    enters. A rank whose own error is the verdict raises that error itself (another exception keeps its traceback);
    the others raise the verdict as a GpttrainError: of their own error's class where they had one, plain where
    their own call succeeded (so `except DataError` around `on_every` is not reached on every rank: a caller that
    must go on after a refusal has `fn` return the reason and gathers it, as bench's sweep does)."""
    error: Exception | None = None
    try:
        value = fn()
    except Exception as e:  # any: a rank leaving here unannounced would leave the others waiting in the gather
        error, value = e, None
    said = None
    if error is not None:
        said = str(error) if isinstance(error, GpttrainError) else f"{type(error).__name__}: {error}"
    verdict = gather_failures(said, info)
    if verdict is None:
        return value
    if error is not None and verdict == said:
        if isinstance(error, GpttrainError):
            error.rank_local = False  # every rank's verdict now: rank 0 says it
        raise error
    raise (type(error) if isinstance(error, GpttrainError) else GpttrainError)(verdict) from error


def free_local_port(low: int = 20000, high: int = 32000) -> int:
    """A free TCP port on 127.0.0.1 for a local rendezvous (tests, benchmarks), chosen below Linux's ephemeral
    range (32768+): a port the kernel hands out with bind(0) can be taken by any outgoing connection before
    the rendezvous binds it again."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {low} and {high}")
