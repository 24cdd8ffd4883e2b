"""The training loop: accumulation, precision, clipping, evaluation, samples, checkpoints.

One process or many (DDP under torchrun). Every decision that must agree across ranks (a
non-finite loss, a stop signal) comes out of an all-reduce, so ranks never diverge.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from gpttrain import distributed as distmod
from gpttrain.config import Config
from gpttrain.distributed import DistInfo
from gpttrain.errors import ConfigError, DataError, GpttrainError
from gpttrain.memory import GIB, estimate_training_memory, suggest_micro_batch
from gpttrain.metrics import lookup_peak_tflops, mfu, model_tflops
from gpttrain.model import GPT, build_model
from gpttrain.monitor import Monitor, gpu_utilization, memory_stats, setup_logging
from gpttrain.optim import build_optimizer, lr_at
from gpttrain.parallel import (
    AUTOCAST_DTYPES,
    apply_activation_checkpointing,
    build_fsdp_model,
    compile_wanted,
    strategy_for,
    wrap_ddp,
)

log = logging.getLogger("gpttrain")

def round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto`: bf16-mixed where the GPU has bf16, fp16-mixed on older GPUs, fp32 elsewhere."""
    if device.type != "cuda":
        if requested in ("auto", "fp32"):
            return "fp32"
        if requested == "fp16-mixed":
            raise ConfigError(f"--train.precision: fp16-mixed needs a CUDA GPU; this run is on {device.type}; "
                              "use fp32 or bf16-mixed")
        return requested  # bf16 autocast works on CPU, if slowly
    bf16_ok = torch.cuda.is_bf16_supported()
    if requested == "auto":
        return "bf16-mixed" if bf16_ok else "fp16-mixed"
    if requested in ("bf16-mixed", "bf16-pure") and not bf16_ok:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"--train.precision: {requested} needs bf16, which {name} lacks; "
                          "use fp16-mixed (or auto)")
    return requested


def resolve_vocab(cfg: Config, tokenizer_vocab: int) -> int:
    """The model's vocabulary: the data's, rounded up to a multiple of 64, unless given explicitly."""
    if "model.vocab_size" in cfg.explicit:
        if cfg.model.vocab_size < tokenizer_vocab:
            raise ConfigError(f"--model.vocab_size: {cfg.model.vocab_size} is smaller than the data's tokenizer "
                              f"vocabulary ({tokenizer_vocab}); use at least {tokenizer_vocab} or leave it unset")
        return cfg.model.vocab_size
    return round_up(tokenizer_vocab, 64)


def plan_steps(cfg: Config, batches_per_epoch: int, tokens_per_step: int) -> int:
    """Total optimizer steps from epochs, steps or tokens (the smallest wins; one epoch if none given)."""
    t = cfg.train
    accum = t.grad_accum_steps
    candidates = []
    if t.max_steps is not None:
        candidates.append(t.max_steps)
    if t.max_tokens is not None:
        candidates.append(math.ceil(t.max_tokens / tokens_per_step))
    if t.epochs is not None or not candidates:
        epochs = t.epochs if t.epochs is not None else 1
        candidates.append(max(epochs * batches_per_epoch // accum, 1))
    return max(min(candidates), 1)


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


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    finite: bool
    stop: bool


class Trainer:
    """Holds the model, optimizer, loaders and counters of one run; `fit()` runs it."""

    def __init__(self, cfg: Config, info: DistInfo, *, train_loader=None, val_loader=None, tokenizer=None):
        self.cfg = cfg = copy.deepcopy(cfg)
        self.info = info
        self.device = info.device
        self.run_dir = Path(cfg.run.dir)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.tokenizer = tokenizer  # the caller has fitted cfg.model.vocab_size to it (resolve_vocab)
        self.step = 0
        self.tokens = 0
        self.skipped_steps = 0
        self.evals_done = 0
        self._bar_rates: dict[str, str] = {}
        self.train_time = 0.0  # seconds of training steps, excluding each process's first (compile) step
        self.timed_steps = 0  # the steps train_time covers

        self.strategy = strategy_for(cfg.dist.strategy, info)
        # Same init on every rank (DDP also broadcasts), then a per-rank stream for dropout.
        torch.manual_seed(cfg.train.seed)
        if self.strategy == "fsdp":
            self.model: GPT = build_fsdp_model(cfg.model, info, self.precision, cfg.train.activation_checkpointing)
        else:
            self.model = build_model(cfg.model, self.device)
            if self.precision == "bf16-pure":
                self.model.to(torch.bfloat16)
        fused = cfg.train.fused_loss
        self.model.chunked_loss = fused == "on" or (fused == "auto" and self.device.type == "cuda")
        torch.manual_seed(cfg.train.seed + 1000 * info.rank)
        if cfg.run.init_from:
            from gpttrain.export import init_from_hf

            init_from_hf(self.model, cfg.run.init_from)
            log.info("initialised weights from %s", cfg.run.init_from)

        self.base_lr = cfg.optim.lr * (info.world_size if cfg.optim.scale_lr_with_world else 1)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.base_lr, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16-mixed")

        self.train_loader = train_loader
        self.val_loader = val_loader
        self.tokens_per_micro = cfg.train.micro_batch_size * cfg.model.context_length * info.world_size
        self.tokens_per_step = self.tokens_per_micro * cfg.train.grad_accum_steps
        batches_per_epoch = train_loader.batches_per_epoch if train_loader is not None else 1
        self.total_steps = plan_steps(cfg, batches_per_epoch, self.tokens_per_step)
        self.peak_tflops = cfg.log.peak_tflops
        if self.peak_tflops is None and self.device.type == "cuda":
            self.peak_tflops = lookup_peak_tflops(torch.cuda.get_device_name(self.device))

        self.wrapped = self._wrap()

    # ---- setup ---------------------------------------------------------------------------

    def _wrap(self) -> torch.nn.Module:
        model: torch.nn.Module = self.model
        if self.cfg.train.activation_checkpointing and self.strategy != "fsdp":  # FSDP applied it before sharding
            apply_activation_checkpointing(self.model)
        # DDP first, then compile: the compiler splits the graph at DDP's buckets (DDPOptimizer), so
        # gradient all-reduces overlap backward instead of all waiting for its end.
        self.ddp = wrap_ddp(model, self.info) if self.strategy == "ddp" else None
        if self.ddp is not None:
            model = self.ddp
        if compile_wanted(self.cfg.train.compile, self.device):
            mode = self.cfg.train.compile_mode
            model = torch.compile(model, mode=None if mode == "default" else mode)
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

    def close(self) -> None:
        """Drop what holds the process group (DDP's reducer, FSDP's state, the optimizer's references) before
        the group is destroyed: a DDP module that outlives destroy_process_group can abort the process at
        exit ("terminate called without an active exception"), seen in about one 2-rank run in eight."""
        self.wrapped = self.ddp = None
        self.model = self.optimizer = None
        gc.collect()

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters of the run (model/optimizer/loader/RNG are saved beside it by checkpoint.py)."""
        return {"step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps,
                "evals_done": self.evals_done, "train_time": self.train_time, "timed_steps": self.timed_steps}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.tokens = int(sd["tokens"])
        self.skipped_steps = int(sd.get("skipped_steps", 0))
        self.evals_done = int(sd.get("evals_done", 0))
        self.train_time = float(sd.get("train_time", 0.0))
        self.timed_steps = int(sd.get("timed_steps", 0))

    def average_tok_s(self) -> float | None:
        """Global tokens/s over every timed step of the run (resumes included, compile steps excluded)."""
        return self.tokens_per_step * self.timed_steps / self.train_time if self.train_time > 0 else None

    def epoch_progress(self) -> float:
        return float(self.train_loader.progress) if self.train_loader is not None else 0.0

    # ---- one optimizer step -------------------------------------------------------------------

    def train_step(self, stop_requested: bool = False) -> StepResult:
        cfg = self.cfg.train
        model = self.wrapped
        model.train()
        accum = cfg.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for micro in range(accum):
            x, y = self.train_loader.next_batch()
            last = micro == accum - 1
            with self._grad_sync(last):
                with self.autocast():
                    loss = model(x, y)
                # Dividing by accum makes the summed gradients those of one batch of accum x micro.
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()  # FSDP: the norm over all shards
        # One all-reduce carries the loss, the stop flag and this rank's verdict on its gradients, so every
        # rank takes the same decisions from the same summed numbers (a NaN on one rank is a NaN on all).
        grads_bad = (~torch.isfinite(grad_norm.detach().float())).float().reshape(())
        packed = torch.stack([loss_sum / accum, torch.tensor(float(stop_requested), device=self.device), grads_bad,
                              grad_norm.detach().float().reshape(())])
        distmod.all_reduce(packed, self.info, "sum")
        loss_sum_all, stop_votes, bad_votes, norm_sum = packed.tolist()  # the step's one host sync
        loss_val = loss_sum_all / self.info.world_size
        stop = stop_votes > 0
        norm_val = norm_sum / self.info.world_size  # the global norm, the same on every rank
        # With fp16 an overflowing gradient is routine: the scaler skips that step and lowers its scale.
        finite = math.isfinite(loss_val) and (bad_votes == 0 or self.scaler.is_enabled())
        lr = lr_at(self.step, base_lr=self.base_lr, total_steps=self.total_steps,
                   warmup_steps=self.cfg.optim.warmup_steps, schedule=self.cfg.optim.schedule,
                   min_lr_ratio=self.cfg.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if finite or self.scaler.is_enabled():
            # With fp16 the scaler itself skips steps whose gradients overflowed.
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_val, norm_val, finite, stop)

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
            with self.autocast():
                loss = self.model(x, y)  # the plain module: no DDP hooks, no recompiles on odd batch sizes
            totals[0] += loss.double() * x.shape[0]
            totals[1] += x.shape[0]
            batches += 1
        if self.strategy == "fsdp":
            # FSDP forwards are collective: a rank with no windows in the last batches still runs them.
            dummy = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            for _ in range(loader.eval_global_batches(self.cfg.train.eval_batches) - batches):
                with self.autocast():
                    self.model(dummy, dummy)
        distmod.all_reduce(totals, self.info, "sum")
        model.train(was_training)
        return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")

    def evaluate(self) -> dict[str, float]:
        train_loss = self.evaluate_loader(self.train_loader)
        val_loss = self.evaluate_loader(self.val_loader) if self.val_loader is not None else float("nan")
        ppl = math.exp(val_loss) if val_loss < 50 else float("inf")
        return {"train_loss": train_loss, "val_loss": val_loss, "val_ppl": ppl}

    def sample(self) -> str | None:
        """A greedy sample from the prompt, as the original printed periodically. Rank 0 alone with DDP;
        every rank in step under FSDP (its forwards are collective), rank 0 reporting."""
        if self.tokenizer is None or (not self.info.is_main and self.strategy != "fsdp"):
            return None
        from gpttrain.sampling import generate_text

        lg = self.cfg.log
        with self.autocast():
            texts = generate_text(self.model, self.tokenizer, lg.sample_prompt, lg.sample_tokens,
                                  temperature=lg.sample_temperature, top_k=lg.sample_top_k,
                                  seed=self.cfg.train.seed + self.step)  # a private generator: resumes stay exact
        return lg.sample_prompt + texts[0] if self.info.is_main else None

    # ---- the loop ------------------------------------------------------------------------------

    def _memory(self) -> dict[str, float | None]:
        stats = memory_stats(self.device)
        if self.device.type == "cuda" and self.info.distributed:
            t = torch.tensor([stats["mem_alloc_gib"], stats["mem_reserved_gib"], stats["mem_peak_gib"]],
                             device=self.device)
            distmod.all_reduce(t, self.info, "max")  # the worst rank is the one that runs out
            stats = dict(zip(("mem_alloc_gib", "mem_reserved_gib", "mem_peak_gib"), t.tolist()))
        return stats

    def device_memory(self) -> int:
        """Bytes of memory on this rank's GPU (0 off CUDA)."""
        return torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else 0

    def _oom_message(self) -> str:
        t = self.cfg.train
        per_rank = t.micro_batch_size * t.grad_accum_steps
        total = self.device_memory()
        strategy = "fsdp" if self.cfg.dist.strategy == "fsdp" else "ddp"
        est = estimate_training_memory(self.cfg.model, t.micro_batch_size, self.precision, strategy,
                                       self.info.world_size, t.activation_checkpointing)
        fit = suggest_micro_batch(self.cfg.model, 0.9 * total, per_rank, precision=self.precision,
                                  strategy=strategy, world_size=self.info.world_size,
                                  activation_checkpointing=t.activation_checkpointing)
        msg = (f"CUDA out of memory at --train.micro_batch_size {t.micro_batch_size} "
               f"(gpttrain info estimates {est.total / GIB:.1f} GiB per GPU; this GPU has {total / GIB:.1f} GiB).")
        if fit is not None and fit[0] < t.micro_batch_size:
            msg += (f" Try --train.micro_batch_size {fit[0]} --train.grad_accum_steps {fit[1] } "
                    "(same global batch).")
        else:
            msg += (" Try --train.activation_checkpointing true, --dist.strategy fsdp over more GPUs, "
                    "or a smaller model.")
        return msg

    def fit(self) -> int:
        cfg = self.cfg
        info = self.info
        from gpttrain import checkpoint as ckpt

        resumed = ckpt.maybe_resume(self)
        if info.is_main:  # only now: a refused start or resume leaves the run dir as it was
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(cfg.to_json() + "\n", encoding="utf-8")
        monitor = Monitor(self.run_dir, is_main=info.is_main, total_steps=self.total_steps,
                          progress=cfg.log.progress, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                          config=cfg.to_dict(), initial_step=self.step)
        if resumed is not None:
            monitor.record({"kind": "resume", "step": self.step, "tokens": self.tokens, "from": str(resumed),
                            "time": time.time()})
        stop = StopFlag()
        stop.install()
        try:
            return self._loop(monitor, stop)
        except torch.cuda.OutOfMemoryError:
            raise GpttrainError(self._oom_message()) from None
        finally:
            stop.restore()
            monitor.close()

    def _log_start(self) -> None:
        cfg, info = self.cfg, self.info
        t = cfg.train
        log.info("model: %s parameters, %d layers x %d wide, %d heads, context %d, vocab %d",
                 f"{self.model.num_params():,}", cfg.model.n_layers, cfg.model.emb_dim, cfg.model.n_heads,
                 cfg.model.context_length, cfg.model.vocab_size)
        log.info("world: %d process(es) on %s (backend %s, %s), precision %s, compile %s", info.world_size,
                 self.device, info.backend or "none", self.strategy, self.precision,
                 "on" if compile_wanted(t.compile, self.device) else "off")
        log.info("batch: micro-batch %d x %d accumulation x %d ranks = %d sequences = %s tokens per step; "
                 "%d steps (%.2f epochs of %d windows)", t.micro_batch_size, t.grad_accum_steps, info.world_size,
                 t.micro_batch_size * t.grad_accum_steps * info.world_size, f"{self.tokens_per_step:,}",
                 self.total_steps, self.total_steps * t.grad_accum_steps / max(self.train_loader.batches_per_epoch, 1),
                 self.train_loader.windows_per_epoch)
        log.info("optimizer: AdamW lr %.3g (%s%s), weight decay %g, clip %s", self.base_lr, cfg.optim.schedule,
                 f", warmup {cfg.optim.warmup_steps}" if cfg.optim.warmup_steps else "",
                 cfg.optim.weight_decay, cfg.optim.grad_clip or "off")
        log.info("run dir: %s", self.run_dir)

    def _loop(self, monitor: Monitor, stop: StopFlag) -> int:
        from gpttrain import checkpoint as ckpt

        cfg = self.cfg
        t = cfg.train
        self._log_start()
        t_last = time.perf_counter()
        steps_since_log = 0
        first_step_of_process = True
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            res = self.train_step(stop.requested)
            dt = time.perf_counter() - t0
            if not res.finite:
                if t.nonfinite == "skip" and self.skipped_steps < t.max_skipped_steps:
                    self.skipped_steps += 1
                    log.warning("step %d: non-finite loss %s or grad norm %s; step skipped (%d of at most %d)",
                                self.step + 1, res.loss, res.grad_norm, self.skipped_steps, t.max_skipped_steps)
                else:
                    why = "policy stop" if t.nonfinite == "stop" else f"more than {t.max_skipped_steps} skipped"
                    log.error("step %d: non-finite loss %s or grad norm %s (%s); saving and stopping",
                              self.step + 1, res.loss, res.grad_norm, why)
                    ckpt.save(self, reason="nonfinite")
                    more = ("set --train.nonfinite skip" if t.nonfinite == "stop"
                            else "raise --train.max_skipped_steps")
                    raise GpttrainError(f"training stopped at step {self.step}: non-finite loss or gradients "
                                        f"({why}); lower --optim.lr, raise --optim.warmup_steps or {more}; "
                                        f"the last good state is saved in {self.run_dir / 'checkpoints'}")
            self.step += 1
            self.tokens += self.tokens_per_step
            if not first_step_of_process:
                self.train_time += dt
                self.timed_steps += 1
            first_step_of_process = False
            steps_since_log += 1
            monitor.advance(1, {"loss": f"{res.loss:.3f}", **self._bar_rates})

            last = self.step == self.total_steps
            if self.step % t.log_every == 0 or last:
                now = time.perf_counter()
                interval = now - t_last
                t_last = now
                self._log_train(monitor, res, steps_since_log, interval)
                steps_since_log = 0
            if self.step % t.eval_every == 0 or last:
                self._eval_and_report(monitor)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            if res.stop:
                why = f"{stop.signal_name} received" if stop.signal_name else "stop signal received by another rank"
                log.info("%s: saving a checkpoint at step %d and exiting", why, self.step)
                ckpt.save(self, reason="signal")
                return 0
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and not last:
                ckpt.save(self, reason="periodic")
                t_last = time.perf_counter()
        ckpt.save(self, reason="final")
        self._finish()
        return 0

    def _log_train(self, monitor: Monitor, res: StepResult, steps: int, interval: float) -> None:
        info = self.info
        tok_s = steps * self.tokens_per_step / interval if interval > 0 else 0.0
        per_gpu = tok_s / info.world_size
        rec = {
            "kind": "train", "step": self.step, "epoch": round(self.epoch_progress(), 6), "tokens": self.tokens,
            "loss": res.loss, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": res.grad_norm,
            "tok_per_s": tok_s, "tok_per_s_per_gpu": per_gpu,
            "tflops": model_tflops(per_gpu, self.cfg.model), "mfu": mfu(per_gpu, self.cfg.model, self.peak_tflops),
            "mem_peak_gib": self._memory()["mem_peak_gib"], "gpu_util": gpu_utilization(self.device),
            "time": time.time(),
        }
        monitor.record(rec)
        self._bar_rates = {"tok/s": f"{tok_s:,.0f}"}  # shown on the progress bar until the next log step
        if rec["mfu"] is not None:
            self._bar_rates["MFU"] = f"{rec['mfu'] * 100:.1f}%"
        if not monitor.uses_bar:
            mfu_txt = f", MFU {rec['mfu'] * 100:.1f}%" if rec["mfu"] is not None else ""
            log.info("step %d/%d (ep %.2f): loss %.4f | lr %.3g | grad norm %.3f | %s tok/s (%s per GPU), "
                     "%.2f TFLOP/s per GPU%s", self.step, self.total_steps, rec["epoch"], res.loss, rec["lr"],
                     res.grad_norm, f"{tok_s:,.0f}", f"{per_gpu:,.0f}", rec["tflops"], mfu_txt)

    def _eval_and_report(self, monitor: Monitor) -> None:
        ev = self.evaluate()
        self.evals_done += 1
        avg_tok_s = self.average_tok_s()
        mem = self._memory()
        rec = {"kind": "eval", "step": self.step, "epoch": round(self.epoch_progress(), 6), "tokens": self.tokens,
               **ev, "avg_tok_per_s": avg_tok_s, **mem, "time": time.time()}
        monitor.record(rec)
        avg_txt = f", avg tok/s {avg_tok_s:,.0f}" if avg_tok_s else ""
        log.info("Ep %.2f (Step %06d): Train loss %.3f, Val loss %.3f (ppl %.1f)%s", rec["epoch"], self.step,
                 ev["train_loss"], ev["val_loss"], ev["val_ppl"], avg_txt)
        if mem["mem_alloc_gib"] is not None:
            log.info("Allocated memory: %.2f GiB, reserved: %.2f GiB, peak: %.2f GiB (max over ranks)",
                     mem["mem_alloc_gib"], mem["mem_reserved_gib"], mem["mem_peak_gib"])
        lg = self.cfg.log
        if lg.sample_every and self.evals_done % lg.sample_every == 0:
            text = self.sample()
            if text is not None:
                log.info("sample: %s", text.replace("\n", " "))
                with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as f:
                    f.write(f"--- step {self.step} (epoch {rec['epoch']:.2f}, val loss {ev['val_loss']:.3f})\n"
                            f"{text}\n")
        if self.info.is_main:
            from gpttrain.plot import plot_losses, read_metrics

            try:
                plot_losses(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir)
            except Exception as e:  # a plot must never kill a week-long run
                log.warning("could not draw loss plot: %s", e)

    def _finish(self) -> None:
        if not self.info.is_main:
            return
        avg = self.average_tok_s()
        log.info("done: %d steps, %s tokens%s", self.step, f"{self.tokens:,}",
                 f", average {avg:,.0f} tok/s" if avg else "")
        log.info("outputs in %s: config.json, metrics.jsonl, train.log, loss.pdf, loss.png, samples.txt, "
                 "checkpoints/", self.run_dir)


# ---- entry point ---------------------------------------------------------------------------------


def ensure_data(cfg: Config, info: DistInfo) -> Path:
    """The prepared data dir for this run, preparing it on rank 0 when needed (the others wait)."""
    from gpttrain.data.prepare import prepare

    path = cfg.data.path
    if path is not None and (Path(path) / "meta.json").is_file():
        return Path(path)
    if path is None:
        out = Path("data") / f"stdlib-{cfg.data.tokenizer}"
        if cfg.data.tokenizer == "bpe":
            out = Path(f"{out}-{cfg.data.bpe_vocab_size}")
        inputs: list[str] = []
        what = "the embedded corpus (Python's standard library sources)"
    else:
        p = Path(path)
        if not p.exists():
            raise DataError(f"--data: {path!r} does not exist; give a dir made by `gpttrain prepare ... --out DIR`, "
                            "or a text file or directory to prepare")
        if p.is_dir() and any(p.glob("*.bin")):
            raise DataError(f"--data: {path} holds shards but no meta.json (an interrupted prepare?); "
                            f"run `gpttrain prepare ... --out {path}` again")
        # The full path and the tokenizer settings in the name: a/train.txt and b/train.txt never share a dir.
        key = f"{p.resolve()}|{cfg.data.tokenizer}|{cfg.data.bpe_vocab_size}|{cfg.data.tokenizer_file}"
        out = Path("data") / f"{p.stem}-{cfg.data.tokenizer}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        inputs = [str(p)]
        what = str(p)
    error = None
    if info.is_main:
        log.info("preparing %s into %s (tokenizer %s)", what, out, cfg.data.tokenizer)
        try:
            prepare(inputs, out, tokenizer=cfg.data.tokenizer, tokenizer_file=cfg.data.tokenizer_file,
                    bpe_vocab_size=cfg.data.bpe_vocab_size, val_fraction=cfg.data.val_fraction,
                    text_field=cfg.data.text_field, workers=cfg.data.workers)
        except GpttrainError as e:
            error = str(e)
    # The other ranks wait for rank 0's data and share its verdict rather than hang at a barrier.
    error = distmod.broadcast_object(error, info)
    if error is not None:
        raise DataError(error)
    return out


def build_loaders(cfg: Config, info: DistInfo, data_dir: Path):
    from gpttrain.data.loader import WindowLoader

    common = dict(context_length=cfg.model.context_length, stride=cfg.data.stride,
                  micro_batch_size=cfg.train.micro_batch_size, rank=info.rank, world_size=info.world_size,
                  seed=cfg.train.seed, device=info.device)
    train = WindowLoader(data_dir, "train", shuffle=True, **common)
    val = WindowLoader(data_dir, "val", shuffle=False, **common)
    return train, val


def run_training(cfg: Config, quiet: bool = False) -> int:
    with distmod.session(cfg.run.device, cfg.dist.backend, cfg.dist.timeout_s) as info:
        setup_logging(info.is_main, quiet)
        from gpttrain.data.prepare import open_tokenizer

        data_dir = ensure_data(cfg, info)
        tokenizer = open_tokenizer(data_dir)
        vocab = resolve_vocab(cfg, tokenizer.vocab_size)
        cfg = copy.deepcopy(cfg)
        cfg.model.vocab_size = vocab
        cfg.data.path = str(data_dir)
        train_loader, val_loader = build_loaders(cfg, info, data_dir)
        log.info("resolved config:\n%s", cfg.to_json())
        trainer = Trainer(cfg, info, train_loader=train_loader, val_loader=val_loader, tokenizer=tokenizer)
        try:
            return trainer.fit()
        finally:
            trainer.close()
