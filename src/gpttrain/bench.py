"""`gpttrain bench`: time warmed-up training steps of our trainer, on synthetic tokens or real data.

Prints one JSON line. On CPU it also times a minimal plain-PyTorch loop (same model, batch,
precision) in the same run and reports our `overhead`; on CUDA it measures the card's bf16
matmul peak in the same run and reports `peak_ratio` (model TFLOP/s over that peak).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from gpttrain import distributed as distmod
from gpttrain.config import Config, ModelConfig
from gpttrain.errors import ConfigError, DataError
from gpttrain.loss import chunked_loss_wanted, compiles_head
from gpttrain.memory import GIB, USABLE_SHARE, estimate_training_memory
from gpttrain.metrics import eval_time_share, flops_per_token, mfu, model_tflops
from gpttrain.monitor import logging_levels
from gpttrain.optim import build_optimizer
from gpttrain.parallel import (
    AUTOCAST_DTYPES,
    apply_activation_checkpointing,
    attention_context,
    build_local_model,
    compile_model,
    compile_wanted,
    compiled_autograd,
    recompute_dropout_masks,
    recompute_weight_casts,
)

log = logging.getLogger("gpttrain")


class SyntheticLoader:
    """Random token windows of the right shape; enough of the loader interface for the trainer."""

    def __init__(self, cfg: Config, device: torch.device, seed: int = 0):
        self.B, self.T, self.V = cfg.train.micro_batch_size, cfg.model.context_length, cfg.model.vocab_size
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self.batches_per_epoch = 10**9
        self.windows_per_epoch = 10**9
        self.progress = 0.0
        self.batches_done = 0
        self._pool = [torch.randint(0, self.V, (self.B, self.T + 1), generator=self.gen) for _ in range(4)]
        if device.type == "cuda":
            # Pinned, as the real loader's batches are: a non-blocking copy from pageable memory goes through
            # the driver's staging buffer and can make the host wait for the queued kernels, which idles the
            # GPU while the next micro-step is launched. The pool is never written, so reusing it is safe.
            self._pool = [w.pin_memory() for w in self._pool]
        self._i = 0

    def next_batch(self):
        w = self._pool[self._i % len(self._pool)]
        self._i += 1
        w = w.to(self.device, non_blocking=True)
        return w[:, :-1], w[:, 1:]

    def eval_batches(self, n):
        for _ in range(n):
            yield self.next_batch()

    def eval_global_batches(self, n):  # every rank has all n (FSDP's evaluation asks)
        return n

    def state_dict(self):
        return {"i": self._i}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """The card's measured bf16 matmul throughput (n^3 GEMMs), the ceiling we report against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / _time_steps(lambda: a @ b, device, 3, iters) / 1e12


def _time_steps(step_fn, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step after `warmup` steps; CUDA events on GPU, wall clock on CPU."""
    for _ in range(warmup):
        step_fn()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step_fn()
        end.record()
        _sync(device)
        return start.elapsed_time(end) / 1000 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - t0) / steps


# What a kernel (CUDA) or operator (CPU) name says about its work, first match wins (lower-case fragments):
# inductor's matmul templates (max-autotune) are triton_tem_*, its other kernels triton_* (GPU) or cpp_fused_*
# (CPU), named after the ops they fuse (so they come before the attention fragments); cuBLAS GEMMs are
# nvjet/xmma/cutlass kernels on Hopper, flash and cuDNN attention name themselves, fused AdamW and the clipping
# norm run multi_tensor_apply.
WORK_KINDS = (
    ("matmul", ("triton_tem",)),
    ("compiled elementwise", ("triton", "cpp_fused")),
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("optimizer", ("adam", "multi_tensor_apply", "lpnorm", "foreach")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
    ("copy", ("memcpy", "memset", "copy")),
    ("communication", ("nccl", "gloo")),
)


def work_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in WORK_KINDS if any(p in low for p in parts)), "other")


def summarize_profile(spans: list[tuple[str, float, float]], steps: int, wall_us: float, top: int = 25) -> dict:
    """Where a step's time goes, from (name, start_us, end_us) spans of kernels (or operators' self time laid
    end to end on CPU): milliseconds per step by kind and for the `top` names, and how much of the step the
    device was busy (the union of the spans, so overlapping streams count once there, while the kinds add up
    each stream's time and may sum to more)."""
    kinds: dict[str, float] = {}
    names: dict[str, list] = {}
    for name, start, end in spans:
        kinds[work_kind(name)] = kinds.get(work_kind(name), 0.0) + end - start
        entry = names.setdefault(name, [0.0, 0])
        entry[0] += end - start
        entry[1] += 1
    busy, reach = 0.0, float("-inf")
    for _, start, end in sorted(spans, key=lambda s: s[1]):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    per_step = 1000.0 * steps  # microseconds in all steps -> milliseconds per step
    ranked = sorted(names.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "profiled_steps": steps, "step_ms": wall_us / per_step, "busy_ms": busy / per_step,
        "idle_share": max(0.0, 1 - busy / wall_us) if wall_us > 0 else None,
        "ms_by_kind": {k: round(v / per_step, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:120], "ms": round(t / per_step, 3), "calls": c / steps} for n, (t, c) in ranked],
    }


def profile_steps(step_fn, device: torch.device, steps: int = 2) -> dict:
    """Run `steps` more (warm) steps under torch.profiler and summarize them (summarize_profile): CUDA kernels
    on a GPU, operators' self time on CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step_fn()
        _sync(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    if gpu:
        spans = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        if not spans:
            return {"error": "the profiler recorded no CUDA kernels (is CUPTI usable by this user?)"}
    else:  # no device timeline: each operator's self time, end to end (busy = time inside operators)
        spans, t = [], 0.0
        for e in prof.events():
            spans.append((e.name, t, t + e.self_cpu_time_total))
            t += e.self_cpu_time_total
    return summarize_profile(spans, steps, wall_us)


def time_reads(trainer, device: torch.device, steps: int, rounds: int = 2) -> dict:
    """Seconds per step when every step's numbers are read (a log at every step, the worst case): at once, as
    a loop that calls `.item()` each step does, and once the next step is queued, as the trainer reads a log
    step on CUDA, against the same steps unread. On a GPU a read at once leaves the device idle until the host has
    queued the next step. The three are timed in turn, `rounds` times over (each its best), so drift between
    them does not pass for a difference; on CPU, where every step runs as it is called, all three match."""
    from gpttrain.steps import read_steps

    def at_once():
        read_steps([trainer.train_step()])

    queued = []  # the step before, unread

    def late():
        queued.append(trainer.train_step())
        if len(queued) == 2:
            read_steps([queued.pop(0)])

    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in (("unread", trainer.train_step), ("at_once", at_once), ("late", late)):
            t = _time_steps(fn, device, 1, steps)
            queued.clear()
            best[name] = min(best.get(name, t), t)
    out = {"steps": steps, "rounds": rounds, **{f"{name}_step_s": t for name, t in best.items()}}
    for name in ("at_once", "late"):
        out[f"{name}_cost"] = best[name] / best["unread"] - 1
    return out


def time_evaluation(trainer, step_s: float, repeats: int = 2) -> dict:
    """What evaluation costs at the run's settings, on the trainer's loader (its batches stand in for both
    splits): milliseconds per --train.eval_batches batch eager and, where the run compiles evaluation, compiled
    (its first evaluation compiles, untimed: `compile_s`); `sample_ms`, one sample of --log.sample_tokens
    tokens as the trainer draws it (from a 5-token prompt, never stopped early), where the run samples at
    all; `share_at_cadence`, evaluation's share of the time at --train.eval_every given the timed step: the
    losses of both splits, and a sample every --log.sample_every evaluations."""
    device = trainer.device
    t = trainer.cfg.train
    compiles = trainer.eval_compiles

    def evaluate():
        trainer.evaluate_loader(trainer.train_loader)

    out: dict[str, Any] = {"batches": t.eval_batches, "eval_every": t.eval_every}
    trainer.eval_compiles = False
    per_batch = out["eager_ms_per_batch"] = 1000 * _time_steps(evaluate, device, 1, repeats) / t.eval_batches
    out["compiled_ms_per_batch"] = out["compile_s"] = None
    if compiles:
        trainer.eval_compiles = True
        t0 = time.perf_counter()
        evaluate()
        _sync(device)
        out["compile_s"] = time.perf_counter() - t0
        timed = 1000 * _time_steps(evaluate, device, 0, repeats) / t.eval_batches
        if trainer.eval_compiles:  # else it fell back to eager (the trainer logged why)
            per_batch = out["compiled_ms_per_batch"] = timed
    per_eval = 2 * t.eval_batches * per_batch / 1000  # the train split's batches and the val split's
    lg = trainer.cfg.log
    out["sample_ms"] = None
    if lg.sample_every or lg.sample_every_epochs:
        from gpttrain.sampling import generate_ids

        def sample():
            with trainer.autocast():
                generate_ids(trainer.model, [1, 2, 3, 4, 5], lg.sample_tokens, temperature=lg.sample_temperature,
                             top_k=lg.sample_top_k, seed=0)

        out["sample_ms"] = 1000 * _time_steps(sample, device, 1, 1)
        if lg.sample_every:  # samples by epochs are too rare to count
            per_eval += out["sample_ms"] / 1000 / lg.sample_every
    out["share_at_cadence"] = eval_time_share(per_eval, step_s, t.eval_every)
    return out


def plain_loop_step_time(cfg: Config, device: torch.device, precision: str, warmup: int, steps: int,
                         recast: bool = False, residual_dtype: torch.dtype | None = None) -> float:
    """The baseline: the textbook loop (forward, loss, backward, clip, AdamW) with nothing else, around the model
    the trainer builds (the same builder, fp8 linears, chunked loss, activation checkpointing, recast weights,
    dropout masks drawn again in backward, compile, compiled autograd, attention kernel; `recast` and
    `residual_dtype`: the trainer's resolved --train.recompute_weight_casts and residual stream's dtype), so
    `overhead` is the cost of the loop alone."""
    torch.manual_seed(cfg.train.seed)
    model = build_local_model(cfg.model, device, precision, fp8=cfg.train.fp8)
    compiled = compile_wanted(cfg.train.compile, device)
    model.chunked_loss = chunked_loss_wanted(cfg.train.fused_loss, device.type, precision,
                                             compiles_head(compiled, cfg.train.compile_scope))
    model.residual_dtype = residual_dtype
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if recast:
        recompute_weight_casts(model)
    if cfg.train.recompute_dropout_masks:
        recompute_dropout_masks(model)
    opt = build_optimizer(model, cfg.optim, cfg.optim.lr, device)
    run = model
    if compiled:
        run = compile_model(model, cfg.train.compile_scope, cfg.train.compile_mode)
    loader = SyntheticLoader(cfg, device, seed=1)
    dtype = AUTOCAST_DTYPES.get(precision)
    accum = cfg.train.grad_accum_steps

    def step():
        for _ in range(accum):
            x, y = loader.next_batch()
            with attention_context(cfg.train.attention, device), \
                    compiled_autograd(cfg.train.compiled_autograd, cfg.train.compile_mode):
                if dtype is None:
                    loss = run(x, y)
                else:
                    with torch.autocast(device.type, dtype=dtype):
                        loss = run(x, y)
                (loss / accum).backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time_steps(step, device, warmup, steps)


def run_bench(cfg: Config, emit, *, warmup: int = 3, steps: int = 10, sweep: bool = False,
              profile: bool = False, evaluation: bool = False, reads: bool = False) -> int:
    """Time the trainer; `emit(dict)` receives each JSON row on rank 0 (the last one is the result). With
    `profile`, two more steps run under torch.profiler and the row gets their breakdown (`profile`); with
    `evaluation`, evaluations are timed too (`eval`, see time_evaluation); with `reads`, steps whose numbers
    are read at once and one step late (`reads`, see time_reads)."""
    from gpttrain.run import ensure_data, open_data
    from gpttrain.settings import check_run_settings

    if steps < 1:
        raise ConfigError(f"--steps: {steps} must be at least 1")
    if warmup < 0:
        raise ConfigError(f"--warmup: {warmup} must be >= 0")
    with (distmod.session(cfg.run.device, cfg.dist.backend, cfg.dist.timeout_s) as info,
          logging_levels(info.is_main, quiet=True)):
        cfg = copy.deepcopy(cfg)
        # As train: refused settings before any data is prepared, and one verdict for every rank on each.
        distmod.on_every(lambda: check_run_settings(cfg, info), info)
        data_dir, opened = None, None
        if sweep:
            cfg.train.micro_batch_size = 1  # the sweep's first size: data too small for the configured one may do
        if cfg.data.path is not None:
            data_dir = ensure_data(cfg, info)  # a prepared dir, or text to prepare first (as train does)
            # The vocabulary fitted to the data, and its train loader for the (first) micro-batch.
            cfg, _, opened, _ = distmod.on_every(lambda: open_data(cfg, info, data_dir), info)
        source = "synthetic" if data_dir is None else "data"
        sizes = [cfg.train.micro_batch_size]
        if sweep:
            sizes = [2**i for i in range(9)]  # 1 to 256
        results, layout = [], {}
        for mb in sizes:
            if sweep and results:
                # Each rank's reason to stop here (its machine's memory; the speed from rank 0's timings alone),
                # one verdict for every rank: ranks that went on apart would wait for each other for good.
                stop = distmod.gather_failures(_sweep_stops(cfg.model, results, layout, mb, info), info)
                if stop:
                    if info.is_main:
                        log.warning("bench --sweep stops before micro-batch %d: %s", mb, stop)
                    break
            if sweep and results and results[-1]["compile"]:
                # Each size's model compiles afresh: entries left by the last ones would count against
                # torch.compile's recompile limit (8 per function), past which it runs eagerly, unsaid (none
                # where the last size did not compile).
                torch._dynamo.reset()
            c = copy.deepcopy(cfg)
            c.train.micro_batch_size = mb
            # A loader per size: its batches must have the micro-batch being timed.
            if data_dir is None:
                loader = SyntheticLoader(c, info.device, seed=c.train.seed)
            elif opened is not None and mb == cfg.train.micro_batch_size:
                loader, opened = opened, None
            else:  # a later size of a sweep on data (the first is `opened`)
                loader, short = distmod.on_every(functools.partial(_loader_or_why, c, info, data_dir), info)
                # Too little data for this size's batch, on any rank: the sizes before it stand, on every rank.
                if (short := distmod.gather_failures(short, info)) is not None:
                    if info.is_main:
                        log.warning("bench --sweep stops at micro-batch %d: %s", mb, short)
                    break
            try:
                res, layout = _bench_one(c, info, loader, warmup, steps, profile, evaluation, reads)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                log.warning("micro-batch %d does not fit", mb)
                break
            res["source"] = source
            results.append(res)
            if info.is_main and sweep:
                emit(res)
        if not results:
            raise ConfigError("bench: not even micro-batch 1 fits; try activation checkpointing or FSDP")
        best = max(results, key=lambda r: r["tok_per_s"])
        if sweep:
            best = dict(best, best_micro_batch_size=best["micro_batch_size"])
        if info.is_main:
            emit(best)
    return 0


SWEEP_PATIENCE = 2  # sizes in a row no faster than the best so far, after which --sweep stops


def _loader_or_why(cfg: Config, info, data_dir: Path):
    """(the train loader, None), or (None, why) where the data is too small for `cfg`'s batch."""
    from gpttrain.run import build_loaders

    try:
        return build_loaders(cfg, info, data_dir)[0], None
    except DataError as e:
        return None, str(e)


def _sweep_stops(model: ModelConfig, rows: list[dict], layout: dict, mb: int, info) -> str | None:
    """Why `bench --sweep` should not go on to micro-batch `mb` after `rows` (None: go on), by this rank. Rank 0:
    once SWEEP_PATIENCE sizes in a row were no faster than the best so far (tokens/s levels off, then falls,
    once a batch fills the device). Off CUDA, where running out of memory is no exception bench can catch but
    the system killing the process: where the training memory estimated for `mb` with the last size's `layout`
    (`Trainer.memory_layout`), times this machine's ranks, is over USABLE_SHARE of the memory available."""
    if info.is_main:
        best = max(range(len(rows)), key=lambda i: rows[i]["tok_per_s"])
        if len(rows) - 1 - best >= SWEEP_PATIENCE:
            return (f"micro-batch {rows[best]['micro_batch_size']} was the fastest ({rows[best]['tok_per_s']:,.0f} "
                    f"tokens/s) and the {SWEEP_PATIENCE} sizes after it were no faster")
    available = None if info.device.type == "cuda" else host_memory_available()
    if available is None:
        return None  # on CUDA an out-of-memory error ends the sweep
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # this machine's, under torchrun
    need = estimate_training_memory(model, mb, **layout).total
    if need * ranks > USABLE_SHARE * available:
        each = f" ({need / GIB:.1f} GiB for each of this machine's {ranks} ranks)" if ranks > 1 else ""
        return (f"its training memory is estimated at {need * ranks / GIB:.1f} GiB{each}, over {USABLE_SHARE:.0%} "
                f"of the {available / GIB:.1f} GiB available")
    return None


def host_memory_available(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Bytes of memory this process's machine can still give without swapping: Linux's MemAvailable, or less
    where a cgroup (a container's limit, v2 or v1) leaves less; None where unknown (not Linux)."""
    found = []
    try:
        with open(meminfo) as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    root = Path(cgroup)
    for limit, usage, stat, cache in (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                                      ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                       "memory/memory.stat", "total_inactive_file")):
        try:
            cap = (root / limit).read_text().strip()
            if cap == "max" or int(cap) >= 2**60:  # no limit
                continue
            # What the cgroup uses, less the page cache it would drop before killing anything.
            reclaimable = dict(line.split() for line in (root / stat).read_text().splitlines()).get(cache, 0)
            found.append(int(cap) - int((root / usage).read_text()) + int(reclaimable))
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def _bench_one(cfg: Config, info, loader, warmup: int, steps: int, profile: bool = False,
               evaluation: bool = False, reads: bool = False) -> tuple[dict, dict]:
    """One size's row, and the layout of its memory estimate (`Trainer.memory_layout`)."""
    from gpttrain.trainer import Trainer

    device = info.device
    cfg.run.dir = str(Path(cfg.run.dir) / "bench")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(cfg, info, train_loader=loader)
    try:
        res = _time_trainer(trainer, cfg, info, warmup, steps, profile, evaluation, reads)
        # The memory estimate's layout of this run as it is (on CPU too: the loss it computes, not a GPU's).
        layout = trainer.memory_layout(recompute_casts=trainer.recast, fused_loss=trainer.model.chunked_loss)
    finally:
        trainer.close()  # also where a step failed (a sweep's size out of memory): DDP must not outlive its group
    residual = trainer.residual_dtype
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the model and optimizer are gone: room for the 8192^3 matmuls
        peak_measured = matmul_peak_tflops(device)
        res["matmul_peak_tflops"] = peak_measured
        res["peak_ratio"] = res["tflops"] / peak_measured
    elif info.world_size == 1:
        plain = plain_loop_step_time(cfg, device, res["precision"], warmup, steps, res["recompute_weight_casts"],
                                     residual)
        res["plain_step_s"] = plain
        res["overhead"] = res["step_s"] / plain - 1
    else:  # the plain loop is one process's: beside it, our overhead would hold the ranks' communication
        res["plain_step_s"] = res["overhead"] = None
    return res, layout


def _time_trainer(trainer, cfg: Config, info, warmup: int, steps: int, profile: bool, evaluation: bool,
                  reads: bool) -> dict:
    """The row of one trainer: its timed steps, and what `profile`, `evaluation` and `reads` ask for."""
    device = info.device
    step_s = _time_steps(trainer.train_step, device, warmup, steps)
    tok_s = trainer.tokens_per_step / step_s
    per_gpu = tok_s / info.world_size
    compiled = trainer.compiled
    tflops = model_tflops(per_gpu, cfg.model)
    res = {
        "preset": cfg.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": info.world_size, "strategy": trainer.strategy, "precision": trainer.precision,
        "compile": compiled, "compile_mode": cfg.train.compile_mode if compiled else None,
        "compile_scope": cfg.train.compile_scope if compiled else None, "attention": cfg.train.attention,
        "fp8": cfg.train.fp8, "recompute_weight_casts": trainer.recast,
        "recompute_dropout_masks": cfg.train.recompute_dropout_masks,
        "fused_loss": trainer.model.chunked_loss,
        "residual_dtype": str(trainer.residual_dtype).removeprefix("torch.") if trainer.residual_dtype else None,
        "compiled_autograd": cfg.train.compiled_autograd,
        "micro_batch_size": cfg.train.micro_batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
        "context_length": cfg.model.context_length, "params": trainer.model.num_params(),
        "step_s": step_s, "tok_per_s": tok_s, "tok_per_s_per_gpu": per_gpu,
        "flops_per_token": flops_per_token(cfg.model), "tflops": tflops,
        "mfu": mfu(per_gpu, cfg.model, trainer.peak_tflops),
        "mem_peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        # What `gpttrain info` estimates for this run's layout on a GPU: each GPU row checks the estimate.
        "mem_estimate_gib": estimate_training_memory(cfg.model, cfg.train.micro_batch_size,
                                                     **trainer.memory_layout(recompute_casts=trainer.recast)).total
                            / GIB,
    }
    if profile:  # after the timing and the memory reading, which the profiler must not disturb
        try:
            res["profile"] = profile_steps(trainer.train_step, device)
        except Exception as e:  # the timed row stands without its breakdown
            res["profile"] = {"error": f"{type(e).__name__}: {e}"}
            log.warning("bench --profile failed: %s: %s", type(e).__name__, e)
    if reads:
        res["reads"] = time_reads(trainer, device, max(steps // 2, 3))
    if evaluation:
        try:
            res["eval"] = time_evaluation(trainer, step_s)
        except Exception as e:  # the timed row stands without it, as with --profile
            res["eval"] = {"error": f"{type(e).__name__}: {e}"}
            log.warning("bench --eval failed: %s: %s", type(e).__name__, e)
    return res
