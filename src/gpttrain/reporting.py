"""What a run says as it trains: the start's summary, train and eval records with their log lines, samples,
the loss plot, the time by kind at the end.

`Reporting` is the Trainer's reporting half (the trainer inherits it): its methods run the evaluations the loop
asks for and write what the run says (records, log lines, samples.txt, the plot). They change no weights,
optimizer or data state: a sample runs the model without gradients, on a generator of its own.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from gpttrain import distributed as distmod
from gpttrain.config import MAX_SEED
from gpttrain.metrics import EVAL_SHARE_HINT, eval_time_share, mfu, model_tflops
from gpttrain.monitor import Monitor, gpu_utilization, memory_stats
from gpttrain.steps import StepMark, StepStats

log = logging.getLogger("gpttrain")
PLOT_COST_SHARE = 0.01  # of the wall time, at most, spent redrawing loss.pdf/.png during training


class Reporting:
    """The Trainer's records, log lines, samples and plot (see the module's docstring); state of its own: the
    rates on the progress bar, the last sample's step, the last plot's step and cost. The trainer's state it
    moves: `evals_done` (checkpointed: samples come every --log.sample_every evaluations), and evaluation's
    compiled model (`_eval_model`, dropped for eager where it fails)."""

    _bar_rates: dict[str, str]
    _sample_step: int | None
    _plot_step: int | None
    _plot_done: tuple[float, float] | None

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
                                  # a private generator (resumes stay exact), its seed kept in range
                                  seed=(self.cfg.train.seed + self.step) % (MAX_SEED + 1))
        return lg.sample_prompt + texts[0] if self.info.is_main else None

    def _memory(self) -> dict[str, float | None]:
        stats = memory_stats(self.device)
        if self.device.type == "cuda" and self.info.distributed:
            t = torch.tensor([stats["mem_alloc_gib"], stats["mem_reserved_gib"], stats["mem_peak_gib"]],
                             device=self.device)
            distmod.all_reduce(t, self.info, "max")  # the worst rank is the one that runs out
            stats = dict(zip(("mem_alloc_gib", "mem_reserved_gib", "mem_peak_gib"), t.tolist()))
        return stats

    def _epochs_at_end(self) -> float:
        """Where the last step leaves the data: where a resumed run stands (its steps so far may have had another
        global batch, another world size), plus the steps to go at this run's batch."""
        steps_left = self.total_steps - self.step
        return self.epoch_progress() + steps_left * self.cfg.train.grad_accum_steps / max(
            self.train_loader.batches_per_epoch, 1)

    def _log_start(self) -> None:
        cfg, info = self.cfg, self.info
        t = cfg.train
        log.info("model: %s parameters, %d layers x %d wide, %d heads, context %d, vocab %d",
                 f"{self.model.num_params():,}", cfg.model.n_layers, cfg.model.emb_dim, cfg.model.n_heads,
                 cfg.model.context_length, cfg.model.vocab_size)
        compiled = f"on ({t.compile_scope}, mode {t.compile_mode})" if self.compiled else "off"
        log.info("world: %d process(es) on %s (backend %s, %s), precision %s%s, compile %s, attention %s",
                 info.world_size, self.device, info.backend or "none", self.strategy, self.precision,
                 " + fp8" if t.fp8 else "", compiled, t.attention)
        log.info("batch: micro-batch %d x %d accumulation x %d ranks = %d sequences = %s tokens per step; "
                 "%d steps (%.2f epochs of %d windows)", t.micro_batch_size, t.grad_accum_steps, info.world_size,
                 t.micro_batch_size * t.grad_accum_steps * info.world_size, f"{self.tokens_per_step:,}",
                 self.total_steps, self._epochs_at_end(), self.train_loader.windows_per_epoch)
        log.info("optimizer: AdamW lr %.3g (%s%s), weight decay %g, clip %s", self.base_lr, cfg.optim.schedule,
                 f", warmup {cfg.optim.warmup_steps}" if cfg.optim.warmup_steps else "",
                 cfg.optim.weight_decay, cfg.optim.grad_clip or "off")
        log.info("run dir: %s", self.run_dir)
        steps_per_epoch = self.train_loader.batches_per_epoch / t.grad_accum_steps
        if 0 < cfg.log.sample_every_epochs * steps_per_epoch < 1:
            log.warning("--log.sample_every_epochs %g is less than one step (an epoch is %.1f steps): a sample at "
                        "every step, each making the host wait for the device; raise it", cfg.log.sample_every_epochs,
                        steps_per_epoch)

    def _hint_eval_share(self) -> None:
        """Say once per process, from its second evaluation on, when evaluation takes over EVAL_SHARE_HINT of
        the time: a cadence copied from a small run (the original script's every 5 steps) costs a large one."""
        t = self.cfg.train
        mean = self.clock.cadence(self.train_time, self.timed_steps)
        if self.clock.hinted or mean is None or not self.info.is_main:
            return
        parts, per_step = mean
        share = eval_time_share(sum(parts.values()), per_step, t.eval_every)
        if share <= EVAL_SHARE_HINT:
            return
        self.clock.hinted = True
        levers = "raise --train.eval_every or lower --train.eval_batches"
        if parts["sample"] > parts["losses"]:
            levers = "raise --log.sample_every (evaluations per sample) or --train.eval_every"
        log.warning("evaluation takes %.0f%% of this run's time: every %d steps (%.2f s), %.2f s for the losses "
                    "over %d batches of each split and %.2f s for samples, on average; %s to train faster",
                    100 * share, t.eval_every, t.eval_every * per_step, parts["losses"], t.eval_batches,
                    parts["sample"], levers)

    def _report_time(self, monitor: Monitor) -> None:
        """The process's time by kind: a `summary` record in metrics.jsonl and one log line."""
        split = self.clock.split(time.perf_counter(), self.train_time, self.timed_steps, self.cfg.train.eval_every)
        monitor.record({"kind": "summary", "step": self.step, **split, "time": time.time()})
        if not self.info.is_main:
            return
        share = split["eval_share"]
        log.info("time in this process: %.1f s: first step (compile, warm-up) %.1f s, steps %.1f s, %d "
                 "evaluation%s %.1f s%s,%s plots %.1f s, checkpoints %.1f s, other %.1f s", split["wall_s"],
                 split["first_step_s"], split["train_s"], split["evals"], "" if split["evals"] == 1 else "s",
                 split["eval_s"],
                 f" ({100 * share:.1f}% of the time at this cadence)" if share is not None else "",
                 f" samples between them {split['sample_s']:.1f} s," if split["sample_s"] else "",
                 split["plot_s"], split["checkpoint_s"], split["other_s"])

    def _log_train(self, monitor: Monitor, res: StepStats, at: StepMark, steps: int, seconds: float) -> None:
        """A train record: the step's loss and norm at the counters `at`; throughput over the timed steps
        since the last record."""
        info = self.info
        tok_s = per_gpu = tflops = None  # none before the first timed step (each process's first is not timed)
        if steps > 0 and seconds > 0:
            tok_s = steps * self.tokens_per_step / seconds
            per_gpu = tok_s / info.world_size
            tflops = model_tflops(per_gpu, self.cfg.model)
        rec = {
            "kind": "train", "step": at.step, "epoch": round(at.epoch, 6), "tokens": at.tokens,
            "loss": res.loss, "lr": at.lr, "grad_norm": res.grad_norm,
            "tok_per_s": tok_s, "tok_per_s_per_gpu": per_gpu, "tflops": tflops,
            "mfu": mfu(per_gpu, self.cfg.model, self.peak_tflops) if per_gpu is not None else None,
            "mem_peak_gib": res.mem_peak_gib, "gpu_util": gpu_utilization(self.device),
            "time": time.time(),
        }
        monitor.record(rec)
        rate_txt = "first step of this process (compile, warm-up): not timed"
        if tok_s is not None:
            self._bar_rates = {"tok/s": f"{tok_s:,.0f}"}  # shown on the progress bar until the next log step
            if rec["mfu"] is not None:
                self._bar_rates["MFU"] = f"{rec['mfu'] * 100:.1f}%"
            each = "GPU" if self.device.type == "cuda" else "process"  # (the record's keys say gpu all the same)
            rate_txt = f"{tok_s:,.0f} tok/s ({per_gpu:,.0f} per {each}), {tflops:.2f} TFLOP/s per {each}"
            if rec["mfu"] is not None:
                rate_txt += f", MFU {rec['mfu'] * 100:.1f}%"
        if not monitor.uses_bar:
            log.info("step %d/%d (ep %.2f): loss %.4f | lr %.3g | grad norm %.3f | %s", at.step, self.total_steps,
                     rec["epoch"], res.loss, rec["lr"], res.grad_norm, rate_txt)

    def _eval_and_report(self, monitor: Monitor) -> dict[str, float]:
        """Evaluate, record, sample (every sample_every evaluations), redraw the plot; returns the seconds of
        the losses and the sample (the plot's go to the clock's `plots`: _plot holds them near 1%)."""
        t0 = time.perf_counter()
        ev = self.evaluate()
        eval_seconds = time.perf_counter() - t0
        self.evals_done += 1
        avg_tok_s = self.average_tok_s()
        mem = self._memory()
        rec = {"kind": "eval", "step": self.step, "epoch": round(self.epoch_progress(), 6), "tokens": self.tokens,
               **ev, "avg_tok_per_s": avg_tok_s, "eval_seconds": eval_seconds, **mem, "time": time.time()}
        monitor.record(rec)
        avg_txt = f", avg tok/s {avg_tok_s:,.0f}" if avg_tok_s else ""
        log.info("Ep %.2f (Step %06d): Train loss %.3f, Val loss %.3f (ppl %.1f)%s", rec["epoch"], self.step,
                 ev["train_loss"], ev["val_loss"], ev["val_ppl"], avg_txt)
        if mem["mem_alloc_gib"] is not None:
            log.info("Allocated memory: %.2f GiB, reserved: %.2f GiB, peak: %.2f GiB (max over ranks)",
                     mem["mem_alloc_gib"], mem["mem_reserved_gib"], mem["mem_peak_gib"])
        t1 = time.perf_counter()
        every = self.cfg.log.sample_every
        if every and self.evals_done % every == 0:
            self._report_sample(f", val loss {ev['val_loss']:.3f}")
        sample_seconds = time.perf_counter() - t1
        self._plot(force=self.step == self.total_steps)
        return {"losses": eval_seconds, "sample": sample_seconds}

    def _report_sample(self, about: str = "") -> None:
        """Draw a sample; rank 0 logs it and appends it to samples.txt under a header with `about`."""
        self._sample_step = self.step
        text = self.sample()
        if text is not None:
            log.info("sample: %s", text.replace("\n", " "))
            with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"--- step {self.step} (epoch {self.epoch_progress():.2f}{about})\n{text}\n")

    def _epoch_sample_due(self, before: float) -> bool:
        """--log.sample_every_epochs: whether the step that moved the run from `before` epochs to now passed a
        multiple of it (the same on every rank: progress counts global batches)."""
        every = self.cfg.log.sample_every_epochs
        if not every:
            return False
        eps = 1e-9  # progress is epoch + index / windows: a boundary lands on the float of a whole number
        return math.floor(self.epoch_progress() / every + eps) > math.floor(before / every + eps)

    def _plot(self, force: bool = False) -> None:
        """Redraw loss.pdf/.png once the last drawing's duration / PLOT_COST_SHARE has passed since it ended.

        Drawing takes 0.15-0.3 s (longer with the run's length), which at a fast model's evaluation every
        few seconds would cost the loop several percent; the wait keeps it near 1%. The end of a run and
        a stop always draw (force); no step is drawn twice."""
        if not self.info.is_main or self._plot_step == self.step:
            return
        now = time.perf_counter()
        if not force and self._plot_done is not None:
            last_end, last_seconds = self._plot_done
            if now - last_end < last_seconds / PLOT_COST_SHARE:
                return
        from gpttrain.plot import plot_losses, read_metrics

        try:
            plot_losses(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir)
        except Exception as e:  # a plot must never kill a week-long run
            log.warning("could not draw loss plot: %s", e)
        end = time.perf_counter()
        if self.clock is not None:
            self.clock.plots += end - now
        # A process's first drawing imports matplotlib and warms its caches (on a fresh machine it builds
        # the font cache, seconds): it says nothing of later drawings, so the second one sets the wait.
        self._plot_done = (end, end - now) if self._plot_step is not None else None
        self._plot_step = self.step

    def _finish(self) -> None:
        if not self.info.is_main:
            return
        avg, clock = self.average_tok_s(), self.clock
        here = self.train_time - clock.train_at_start
        # A resumed run's average counts the timed steps of every process it ran in (other GPUs, perhaps).
        mine = (self.timed_tokens - clock.tokens_at_start) / here if clock.steps_at_start and here > 0 else None
        log.info("done: %d steps, %s tokens%s", self.step, f"{self.tokens:,}",
                 (f", average {avg:,.0f} tok/s" if avg else "")
                 + (f" over the run's timed steps, {mine:,.0f} in this process" if mine else ""))
        outputs = [name for name in ("config.json", "metrics.jsonl", "train.log", "loss.pdf", "loss.png", "samples.txt")
                   if (self.run_dir / name).is_file()]
        log.info("outputs in %s: %s", self.run_dir, ", ".join(outputs + ["checkpoints/"]))
