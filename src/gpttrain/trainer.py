"""The training loop: accumulation, precision, clipping, evaluation, samples, checkpoints.

One process or many (DDP under torchrun). Every decision that must agree across ranks (a
non-finite loss, a stop signal) comes out of an all-reduce, so ranks never diverge.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from gpttrain import distributed as distmod
from gpttrain.config import Config
from gpttrain.distributed import DistInfo
from gpttrain.errors import GpttrainError, rank_local
from gpttrain.fp8 import refresh_fsdp_scales
from gpttrain.loss import chunked_loss_wanted, compiles_head
from gpttrain.memory import GIB, USABLE_SHARE, estimate_training_memory, oom_message, run_layout
from gpttrain.metrics import lookup_peak_tflops
from gpttrain.model import GPT
from gpttrain.monitor import Monitor
from gpttrain.optim import build_optimizer, lr_at
from gpttrain.parallel import (
    AUTOCAST_DTYPES,
    apply_activation_checkpointing,
    attention_context,
    build_fsdp_model,
    build_local_model,
    compile_model,
    compiled_autograd,
    recompute_dropout_masks,
    recompute_weight_casts,
    release_ddp,
    residual_dtype_for,
    wrap_ddp,
)
from gpttrain.reporting import Reporting
from gpttrain.settings import check_run_settings, plan_steps
from gpttrain.steps import LoopClock, StepMark, StepStats, StopFlag, read_steps

log = logging.getLogger("gpttrain")


class Trainer(Reporting):
    """Holds the model, optimizer, loaders and counters of one run; `fit()` runs it (its records, log lines,
    samples and plot: `Reporting`)."""

    def __init__(self, cfg: Config, info: DistInfo, *, train_loader=None, val_loader=None, tokenizer=None):
        self.cfg = cfg = copy.deepcopy(cfg)
        self.info = info
        self.device = info.device
        self.run_dir = Path(cfg.run.dir)
        self.tokenizer = tokenizer  # the caller has fitted cfg.model.vocab_size to it (resolve_vocab)
        self.step = 0
        self.tokens = 0
        self.skipped_steps = 0
        self.evals_done = 0
        self.saved_step: int | None = None  # the step of the checkpoint this process saved or resumed last
        self._bar_rates: dict[str, str] = {}
        self.train_time = 0.0  # seconds of training steps, excluding each process's first (compile) step
        self.timed_steps = 0  # the steps train_time covers
        self.timed_tokens = 0  # and their tokens (a resumed run's earlier steps may have had another global batch)
        self._plot_done: tuple[float, float] | None = None  # (end, seconds) of the last loss-plot drawing
        self._plot_step: int | None = None  # the step it showed
        self._sample_step: int | None = None  # the step of the last sample
        self.clock: LoopClock | None = None  # set by the loop

        self.precision, self.strategy, self.compiled = check_run_settings(cfg, info)
        if cfg.train.compiled_autograd and cfg.train.grad_accum_steps == 1 and info.is_main:
            log.warning("--train.compiled_autograd true with --train.grad_accum_steps 1: there is no gradient "
                        "accumulation to fold into backward, which is what the flag is for; it still compiles "
                        "the whole backward once more%s: drop it unless you are comparing",
                        " and builds DDP with its Python reducer" if self.strategy == "ddp" else "")
        self.recast = self.memory_layout()["recompute_casts"]  # the weight casts recomputed in backward
        if cfg.train.recompute_weight_casts == "auto" and info.distributed:
            # One choice for all ranks, whatever their GPUs' sizes: recast where any rank needs it.
            flag = torch.tensor([float(self.recast)], device=self.device)
            self.recast = bool(distmod.all_reduce(flag, info, "max").item())
        if self.recast and cfg.train.recompute_weight_casts == "auto" and info.is_main:
            kept = estimate_training_memory(cfg.model, cfg.train.micro_batch_size,
                                            **self.memory_layout(recompute_casts=False))
            log.info("recomputing the 16-bit weight casts in backward (--train.recompute_weight_casts auto): the "
                     "memory estimate with them kept, %.1f GiB, is over %.0f%% of this GPU's %.1f GiB",
                     kept.total / GIB, 100 * USABLE_SHARE, self.device_memory() / GIB)
        self.residual_dtype = residual_dtype_for(cfg.train.residual_dtype, self.precision, self.strategy)
        torch.manual_seed(cfg.train.seed)
        if self.strategy == "fsdp":
            self.model: GPT = build_fsdp_model(cfg.model, info, self.precision, cfg.train.activation_checkpointing,
                                               fp8=cfg.train.fp8)
        else:
            self.model = build_local_model(cfg.model, self.device, self.precision, fp8=cfg.train.fp8)
        self.model.chunked_loss = chunked_loss_wanted(cfg.train.fused_loss, self.device.type, self.precision,
                                                      compiles_head(self.compiled, cfg.train.compile_scope))
        self.model.residual_dtype = self.residual_dtype
        self.fp8_all_gather = cfg.train.fp8 and self.strategy == "fsdp"  # fp8 weights gathered with their scales
        torch.manual_seed(cfg.train.seed + 1000 * info.rank)
        if cfg.run.init_from:
            from gpttrain.export import check_init_from, init_from_hf

            check_init_from(cfg.run.init_from, tokenizer.spec() if tokenizer is not None else None)
            init_from_hf(self.model, cfg.run.init_from)
            log.info("initialised weights from %s", cfg.run.init_from)

        self.base_lr = cfg.optim.lr * (info.world_size if cfg.optim.scale_lr_with_world else 1)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.base_lr, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16-mixed")
        self._stop_flag = torch.zeros((), device=self.device)  # refilled each step: no host-to-device copy

        self.train_loader = train_loader
        self.val_loader = val_loader
        self.tokens_per_micro = cfg.train.micro_batch_size * cfg.model.context_length * info.world_size
        self.tokens_per_step = self.tokens_per_micro * cfg.train.grad_accum_steps
        self.total_steps = self.plan_steps()
        if cfg.optim.warmup_steps > self.total_steps and info.is_main:
            log.warning("--optim.warmup_steps %d covers the whole run (%d steps): the learning rate never reaches "
                        "--optim.lr %g", cfg.optim.warmup_steps, self.total_steps, cfg.optim.lr)
        self.peak_tflops = cfg.log.peak_tflops
        if self.peak_tflops is None and self.device.type == "cuda":
            self.peak_tflops = lookup_peak_tflops(torch.cuda.get_device_name(self.device))

        self.wrapped = self._wrap()
        # What evaluation calls: the plain model (no DDP hooks), compiled at the first evaluation where
        # training compiles the whole model; eager per block or under FSDP, as parallel.compile_model says.
        self._eval_model: torch.nn.Module | None = None
        self.eval_compiles = (compiles_head(self.compiled, cfg.train.compile_scope) and cfg.train.compile_eval
                               and self.strategy != "fsdp")
        # A log step's numbers are read once the next step is queued on CUDA, where the device runs behind the
        # host, so it never idles while the host logs. Off CUDA (CPU; mps, whose reads wait for all that is
        # queued) a late read would count the next step's time in the record's tok/s: they read at once.
        self.read_late = self.device.type == "cuda"

    # ---- setup ---------------------------------------------------------------------------

    def _wrap(self) -> torch.nn.Module:
        model: torch.nn.Module = self.model
        if self.cfg.train.activation_checkpointing and self.strategy != "fsdp":  # FSDP applied it before sharding
            apply_activation_checkpointing(self.model)
        if self.recast:
            recompute_weight_casts(self.model)
        if self.cfg.train.recompute_dropout_masks:
            recompute_dropout_masks(self.model)
        # DDP first, then compile: the compiler splits the graph at DDP's buckets (DDPOptimizer), so
        # gradient all-reduces overlap backward instead of all waiting for its end.
        self.ddp = (wrap_ddp(model, self.info, python_reducer=self.cfg.train.compiled_autograd)
                    if self.strategy == "ddp" else None)
        if self.ddp is not None:
            model = self.ddp
        if self.compiled:
            # scope "model" returns the compiled wrapper; "blocks" compiles each block in place, returns `model`.
            model = compile_model(model, self.cfg.train.compile_scope, self.cfg.train.compile_mode)
        return model

    def _grad_sync(self, last: bool):
        """Gradients are reduced only on the last micro-step of an accumulation."""
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def backward_compiler(self):
        """--train.compiled_autograd: around a micro-step's forward and backward."""
        return compiled_autograd(self.cfg.train.compiled_autograd, self.cfg.train.compile_mode)

    def attention(self):
        """--train.attention's kernel, around forward and backward (compile picks it when it first traces)."""
        return attention_context(self.cfg.train.attention, self.device)

    def close(self) -> None:
        """Drop what holds the process group (DDP's reducer, FSDP's state, the optimizer's references) before
        the group is destroyed: a DDP module that outlives destroy_process_group can abort the process at
        exit ("terminate called without an active exception"), seen in about one 2-rank run in eight."""
        release_ddp(self.ddp)
        self.wrapped = self.ddp = self._eval_model = None
        self.model = self.optimizer = None
        gc.collect()

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters of the run (model/optimizer/loader/RNG are saved beside it by checkpoint.py)."""
        return {"step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps,
                "evals_done": self.evals_done, "train_time": self.train_time, "timed_steps": self.timed_steps,
                "timed_tokens": self.timed_tokens}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.tokens = int(sd["tokens"])
        self.skipped_steps = int(sd.get("skipped_steps", 0))
        self.evals_done = int(sd.get("evals_done", 0))
        self.train_time = float(sd.get("train_time", 0.0))
        self.timed_steps = int(sd.get("timed_steps", 0))
        self.timed_tokens = int(sd.get("timed_tokens", self.timed_steps * self.tokens_per_step))  # (older ones)

    def plan_steps(self) -> int:
        """The run's total optimizer steps, from where it stands (a resumed run: `settings.plan_steps`)."""
        loader = self.train_loader
        return plan_steps(self.cfg, loader.batches_per_epoch if loader is not None else 1, self.tokens_per_step,
                          step=self.step, tokens=self.tokens, batches_done=loader.batches_done if loader else 0)

    def average_tok_s(self) -> float | None:
        """Global tokens/s over every timed step of the run (resumes included, compile steps excluded)."""
        return self.timed_tokens / self.train_time if self.train_time > 0 else None

    def epoch_progress(self) -> float:
        return float(self.train_loader.progress) if self.train_loader is not None else 0.0

    # ---- one optimizer step -------------------------------------------------------------------

    def train_step(self, stop_requested: bool = False) -> StepStats:
        """One optimizer step, queued on the device without waiting for it: the non-finite check and the
        skip of a bad update happen there too (fused AdamW's `found_inf`), so nothing here reads a value
        back. The returned numbers are read when the loop needs them."""
        cfg = self.cfg.train
        model = self.wrapped
        model.train()
        accum = cfg.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for micro in range(accum):
            x, y = self.train_loader.next_batch()
            last = micro == accum - 1
            with self._grad_sync(last), self.attention(), self.backward_compiler():
                with self.autocast():
                    loss = model(x, y)
                # Dividing by accum makes the summed gradients those of one batch of accum x micro.
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        else:  # clipping off: the norm alone (for the log and the non-finite check)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()  # FSDP: the norm over all shards
        grad_norm = grad_norm.detach().float().reshape(())
        # One all-reduce carries the loss, the stop flag and this rank's verdict on its gradients, so every
        # rank takes the same decisions from the same summed numbers (a NaN on one rank is a NaN on all).
        packed = torch.stack([loss_sum / accum, self._stop_flag.fill_(float(stop_requested)),
                              (~torch.isfinite(grad_norm)).float(), grad_norm])
        if self.device.type == "cuda":
            # The memory peak travels in the same all-reduce, one slot per rank (filled on the device, so no
            # copy from the host): the train record needs no collective of its own, which would wait for the
            # device.
            peaks = torch.zeros(self.info.world_size, device=self.device)
            peaks[self.info.rank].fill_(torch.cuda.max_memory_allocated(self.device) / GIB)
            packed = torch.cat([packed, peaks])
        distmod.all_reduce(packed, self.info, "sum")
        lr = lr_at(self.step, base_lr=self.base_lr, total_steps=self.total_steps,
                   warmup_steps=self.cfg.optim.warmup_steps, schedule=self.cfg.optim.schedule,
                   min_lr_ratio=self.cfg.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        bad = ((packed[2] > 0) | ~torch.isfinite(packed[0])).float()  # the same verdict on every rank
        if self.scaler.is_enabled():
            # fp16: the scaler skips steps whose gradients overflowed (on the device with fused AdamW). Our
            # verdict joins its own, so a non-finite loss with finite gradients is skipped too (and the scale
            # backs off, as for an overflow).
            for found_inf in self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values():
                torch.maximum(found_inf, bad.to(found_inf.device), out=found_inf)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.optimizer.defaults.get("fused"):
            # Fused AdamW leaves parameters, moments and its step count as they were where found_inf is
            # non-zero (the mechanism GradScaler uses), so a bad step is skipped without a host sync.
            self.optimizer.found_inf, self.optimizer.grad_scale = bad, None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        elif not bad.item():  # a host sync, for optimizers that cannot skip on the device (--optim.fused off)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.fp8_all_gather:
            refresh_fsdp_scales(self.model)  # the next forward gathers these weights in fp8, with their scales
        return StepStats(packed, self.info.world_size, self.scaler.is_enabled())

    # ---- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_loader(self, loader) -> float:
        """Mean loss over the loader's fixed eval windows, every rank its part, reduced exactly."""
        model = self.wrapped
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        batches = 0
        for x, y in loader.eval_batches(self.cfg.train.eval_batches):
            loss = self._eval_loss(x, y)
            totals[0] += loss.double() * x.shape[0]
            totals[1] += x.shape[0]
            batches += 1
        if self.strategy == "fsdp":
            # FSDP forwards are collective: a rank with no windows in the last batches still runs them.
            dummy = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            for _ in range(loader.eval_global_batches(self.cfg.train.eval_batches) - batches):
                with self.autocast(), self.attention():
                    self.model(dummy, dummy)
        distmod.all_reduce(totals, self.info, "sum")
        model.train(was_training)
        return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")

    def _eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One eval batch's mean loss, through the compiled forward where there is one. An error there (not a
        CUDA OOM; one inside inductor's compile arrives wrapped and counts as a failure) is said once and
        evaluation goes on eagerly, which raises it again if it is not the compiler's: training must not die at
        an evaluation for a graph it never needed."""
        if self.eval_compiles and self._eval_model is None:
            # Static shapes: the last batch may be short; a graph of its own beats a dynamic one for all.
            self._eval_model = torch.compile(self.model, dynamic=False)
        with self.autocast(), self.attention():
            if self.eval_compiles:
                try:
                    return self._eval_model(x, y)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as e:  # compile or run: eager below is the same model (it raises what is real)
                    log.warning("the compiled evaluation failed (%s: %s); evaluating eagerly from now on "
                                "(--train.compile_eval false skips the attempt)", type(e).__name__,
                                str(e).splitlines()[0] if str(e) else "")
                    self.eval_compiles, self._eval_model = False, None
            return self.model(x, y)

    def evaluate(self) -> dict[str, float]:
        train_loss = self.evaluate_loader(self.train_loader)
        val_loss = self.evaluate_loader(self.val_loader) if self.val_loader is not None else float("nan")
        ppl = math.exp(val_loss) if val_loss < 50 else float("inf")
        return {"train_loss": train_loss, "val_loss": val_loss, "val_ppl": ppl}

    # ---- the loop ------------------------------------------------------------------------------

    def device_memory(self) -> int:
        """Bytes of memory on this rank's GPU (0 off CUDA)."""
        return torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else 0

    def memory_layout(self, **overrides) -> dict:
        """This run's `run_layout` (the memory estimate's keywords), `overrides` on top."""
        return run_layout(self.cfg.model, self.cfg.train, self.precision, self.compiled, self.device_memory(),
                          strategy="fsdp" if self.strategy == "fsdp" else "ddp", world_size=self.info.world_size,
                          **overrides)

    def _oom_message(self) -> str:
        return oom_message(self.cfg.model, self.cfg.train, self.precision, self.compiled, self.recast,
                           self.memory_layout(recompute_casts=self.recast), self.device_memory())

    def fit(self) -> int:
        cfg = self.cfg
        info = self.info
        from gpttrain.resume import maybe_resume

        resumed = maybe_resume(self)
        if resumed is not None:
            self.total_steps = self.plan_steps()  # its steps so far may have had another global batch
        if self.fp8_all_gather:
            refresh_fsdp_scales(self.model)  # of the weights as initialised, set from --run.init_from or resumed
        if info.is_main:  # only now: a refused start or resume leaves the run dir as it was
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(cfg.to_json() + "\n", encoding="utf-8")
        monitor = Monitor(self.run_dir, is_main=info.is_main, total_steps=self.total_steps,
                          progress=cfg.log.progress, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                          config=cfg.to_dict(), initial_step=self.step)
        if resumed is not None:
            monitor.record({"kind": "resume", "step": self.step, "tokens": self.tokens, "from": str(resumed),
                            "time": time.time()})
        else:  # what metrics.jsonl holds before this (a run that died before its first checkpoint) is not plotted
            monitor.record({"kind": "start", "step": self.step, "time": time.time()})
        stop = StopFlag()
        stop.install()
        try:
            return self._loop(monitor, stop)
        except torch.cuda.OutOfMemoryError:
            raise rank_local(GpttrainError(self._oom_message())) from None  # this rank's GPU; the others wait
        finally:
            stop.restore()
            if self._plot_step is not None:  # an error's exit too: the plot drawn so far shows its last records
                self._plot(force=True)
            monitor.close()

    def _loop(self, monitor: Monitor, stop: StopFlag) -> int:
        t = self.cfg.train
        self._log_start()
        pending: list[StepStats] = []  # steps queued on the device whose numbers the host has not read yet
        t_mark = time.perf_counter()
        clock = self.clock = LoopClock(t_mark, self.train_time, self.timed_steps, self.timed_tokens)
        logged = (self.train_time, self.timed_steps)  # the counters at the last train record
        first_step_of_process = True
        bar_loss = {}
        deferred: StepMark | None = None  # a log step whose numbers are read once the next step is queued

        def take(steps: list[StepStats], at: StepMark, record: bool) -> tuple[list[tuple[int, StepStats]], bool]:
            """Read `steps` (one wait), time them and, if `record`, write the train record of `at`, the last of
            them; returns the non-finite ones (step number, numbers) and whether any of them voted to stop."""
            nonlocal t_mark, logged, first_step_of_process, bar_loss
            read_steps(steps)
            now = time.perf_counter()
            if not first_step_of_process:  # each process's first step compiles and warms up: not timed
                self.train_time += now - t_mark
                self.timed_steps += len(steps)
                self.timed_tokens += len(steps) * self.tokens_per_step
            else:
                clock.first_step = now - t_mark
            first_step_of_process = False
            t_mark = now
            bar_loss = {"loss": f"{steps[-1].loss:.3f}"}
            if record:
                self._log_train(monitor, steps[-1], at, self.timed_steps - logged[1], self.train_time - logged[0])
                logged = (self.train_time, self.timed_steps)
            bad = [(at.step - len(steps) + 1 + i, r) for i, r in enumerate(steps) if not r.finite]
            return bad, any(r.stop for r in steps)

        while self.step < self.total_steps:
            before = self.epoch_progress()
            pending.append(self.train_step(stop.requested))
            self.step += 1
            self.tokens += self.tokens_per_step
            last = self.step == self.total_steps
            log_now = self.step % t.log_every == 0 or last
            eval_now = self.step % t.eval_every == 0 or last
            ckpt_now = bool(t.checkpoint_every) and self.step % t.checkpoint_every == 0 and not last
            sample_now = self._epoch_sample_due(before)
            bad, stop_now = [], False
            if deferred is not None:
                # The last log step's numbers, read now that this step is queued behind them: the device works
                # on it while the host waits for them and logs (reading at the log step itself would leave the
                # device idle until the host had queued the next step).
                bad, stop_now = take(pending[:deferred.steps], deferred, record=True)
                del pending[:deferred.steps]
                deferred = None
            read_now = eval_now or ckpt_now or sample_now or stop_now or bad or first_step_of_process
            if not (read_now or (log_now and not self.read_late)):
                if log_now:
                    deferred = self._mark(len(pending))
                monitor.advance(1, {**bar_loss, **self._bar_rates})
                continue
            # The host waits for the device here, at steps every rank knows in advance (a stop or a non-finite
            # step is acted on with this step read too), so the decisions below (skip, stop) are taken at the
            # same step everywhere, and a state saved here has had every one of its steps checked.
            more_bad, more_stop = take(pending, self._mark(len(pending)), record=log_now)
            pending.clear()
            for step, res in bad + more_bad:
                self._nonfinite(step, res)
            stop_now = stop_now or more_stop
            monitor.advance(1, {**bar_loss, **self._bar_rates})
            if eval_now:
                clock.evals.append(self._eval_and_report(monitor))
                self._hint_eval_share()
            if sample_now and self._sample_step != self.step:  # not twice at a step whose evaluation sampled
                t_sample = time.perf_counter()
                self._report_sample()
                clock.samples += time.perf_counter() - t_sample
            if stop_now:
                why = f"{stop.signal_name} received" if stop.signal_name else "stop signal received by another rank"
                log.info("%s: saving a checkpoint at step %d and exiting", why, self.step)
                self._save(reason="signal")
                self._plot(force=True)
                self._report_time(monitor)
                return 0
            if ckpt_now:
                self._save(reason="periodic")
            if self.info.distributed and (eval_now or sample_now):
                # Rank 0 alone plots and logs here (and samples, under DDP): the others would start the next step
                # meanwhile, off its clock, and its next record would count their head start as throughput.
                distmod.barrier(self.info)
            t_mark = time.perf_counter()  # evaluation and checkpoint time is not training throughput
        self._save(reason="final")
        self._report_time(monitor)
        self._finish()
        return 0

    def _mark(self, steps: int) -> StepMark:
        """The counters after this step, for the train record of a step whose numbers are read later."""
        return StepMark(self.step, self.epoch_progress(), self.tokens, self.optimizer.param_groups[0]["lr"], steps)

    def _save(self, reason: str) -> None:
        from gpttrain import checkpoint as ckpt

        t0 = time.perf_counter()
        ckpt.save(self, reason=reason)
        self.clock.checkpoints += time.perf_counter() - t0

    def _nonfinite(self, step: int, res: StepStats) -> None:
        """A step whose loss or gradients were not finite: its update was already skipped on the device;
        count it under --train.nonfinite skip, or save the (good) state and stop."""
        t = self.cfg.train
        if t.nonfinite == "skip" and self.skipped_steps < t.max_skipped_steps:
            self.skipped_steps += 1
            if self.info.is_main:  # every rank has the same verdict: said once
                log.warning("step %d: non-finite loss %s or grad norm %s; step skipped (%d of at most %d)",
                            step, res.loss, res.grad_norm, self.skipped_steps, t.max_skipped_steps)
            return
        why = "policy stop" if t.nonfinite == "stop" else f"more than {t.max_skipped_steps} skipped"
        if self.info.is_main:
            log.error("step %d: non-finite loss %s or grad norm %s (%s); its update was not applied; saving and "
                      "stopping at step %d", step, res.loss, res.grad_norm, why, self.step)
        self._save(reason="nonfinite")
        self._plot(force=True)
        more = "set --train.nonfinite skip" if t.nonfinite == "stop" else "raise --train.max_skipped_steps"
        raise GpttrainError(f"training stopped at step {self.step}: non-finite loss or gradients at step {step} "
                            f"({why}); lower --optim.lr, raise --optim.warmup_steps or {more}; the state saved "
                            f"in {self.run_dir / 'checkpoints'} has no update from a non-finite step")
