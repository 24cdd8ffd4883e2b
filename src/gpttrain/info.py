"""`gpttrain info`: what a config means before any run: size, FLOPs, and whether it fits."""

from __future__ import annotations

import logging
from collections.abc import Callable

from gpttrain.config import Config
from gpttrain.errors import ConfigError
from gpttrain.fp8 import check_fp8_settings
from gpttrain.loss import compiles_head
from gpttrain.memory import (
    CUDA_CONTEXT_GIB,
    GIB,
    USABLE_SHARE,
    estimate_training_memory,
    recast_applies,
    run_layout,
    suggest_micro_batch,
)
from gpttrain.metrics import EVAL_SHARE_HINT, eval_flop_share, flops_per_token, matmul_params
from gpttrain.model import count_params
from gpttrain.parallel import (
    AUTOCAST_DTYPES,
    check_compiled_autograd,
    check_recompute_dropout_masks,
    check_recompute_weight_casts,
    residual_dtype_for,
)

log = logging.getLogger("gpttrain")

PRECISIONS = ("fp32", "bf16-mixed", "bf16-pure")


def gpu_layout(cfg: Config, precision: str, gpu_mem_gib: float, **overrides) -> dict:
    """`run_layout` for a run of `cfg` in `precision` on GPUs of `gpu_mem_gib`: compiled unless `--train.compile
    off` (auto compiles on Linux GPUs, where such runs are)."""
    return run_layout(cfg.model, cfg.train, precision, cfg.train.compile != "off", gpu_mem_gib * GIB, **overrides)


def memory_table(cfg: Config, gpus: int, gpu_mem_gib: float) -> list[dict]:
    """Rows of per-GPU estimates: each precision x (DDP, FSDP over 2..gpus) x activation checkpointing, as runs
    on GPUs of `gpu_mem_gib` would be laid out (`recompute_casts`: whether the weight casts are recomputed)."""
    mb = cfg.train.micro_batch_size
    fsdp_sizes = sorted({n for n in (2, 4, 8) if n <= gpus} | ({gpus} if gpus > 1 else set()))
    rows = []
    for precision in PRECISIONS:
        for strategy, world in [("ddp", 1)] + [("fsdp", n) for n in fsdp_sizes]:
            for ac in (False, True):
                layout = gpu_layout(cfg, precision, gpu_mem_gib, strategy=strategy, world_size=world,
                                    activation_checkpointing=ac)
                est = estimate_training_memory(cfg.model, mb, **layout)
                recast = layout["recompute_casts"] and recast_applies(precision, layout["compiled"], strategy, ac,
                                                                      layout["fp8"])
                rows.append({"precision": precision, "strategy": strategy, "gpus": world,
                             "activation_checkpointing": ac, "micro_batch_size": mb, "recompute_casts": recast,
                             "residual_16bit": layout["residual_16bit"], "fp8": layout["fp8"], **est.as_gib()})
    return rows


def _fit_to_data(cfg: Config) -> str | None:
    """With --data, the model's vocabulary as `train` fits it to the data (set in `cfg`): a prepared dir's
    tokenizer, or text's where its size is known before it is prepared (byte). A line saying so, or None."""
    from pathlib import Path

    from gpttrain.data.shards import load_meta
    from gpttrain.run import is_prepared, resolve_vocab
    from gpttrain.tokenizer import ByteTokenizer

    if cfg.data.path is None:
        return None
    p = Path(cfg.data.path)
    if is_prepared(p):
        tok = load_meta(p)["tokenizer"]
        cfg.model.vocab_size = resolve_vocab(cfg, tok["vocab_size"])
        return f"vocabulary: {cfg.model.vocab_size}, from {p}'s {tok['kind']} tokenizer ({tok['vocab_size']} tokens)"
    if cfg.data.tokenizer == "byte":
        cfg.model.vocab_size = resolve_vocab(cfg, ByteTokenizer.vocab_size)
        return f"vocabulary: {cfg.model.vocab_size}, from the byte tokenizer {p} will be prepared with"
    return (f"vocabulary: {cfg.model.vocab_size} as set; a run follows the {cfg.data.tokenizer} tokenizer {p} is "
            "prepared with (gpttrain prepare it, then pass the prepared dir to see that one)")


def run_info(cfg: Config, *, gpus: int = 4, gpu_mem_gib: float = 24.0, as_json: bool = False,
             emit: Callable[[dict], None]) -> int:
    """Report `cfg`'s size, FLOPs and memory estimates. Text goes to the log; with `as_json` the one JSON object
    goes to `emit` (the CLI prints it to stdout, so `-q` does not swallow it)."""
    if gpus < 1:
        raise ConfigError(f"--gpus: {gpus} must be at least 1")
    if not CUDA_CONTEXT_GIB < gpu_mem_gib < float("inf"):  # NaN too
        raise ConfigError(f"--gpu-mem: {gpu_mem_gib} must be a number of GiB above {CUDA_CONTEXT_GIB:g} (the CUDA "
                          "context's share)")
    note = _fit_to_data(cfg)
    # Refused as a GPU run of this config would refuse it.
    gpu_precision = "bf16-mixed" if cfg.train.precision == "auto" else cfg.train.precision
    gpu_strategy = "fsdp" if cfg.dist.strategy == "fsdp" else "ddp"
    if cfg.train.recompute_weight_casts is True:
        check_recompute_weight_casts(gpu_precision, cfg.train.compile != "off", gpu_strategy)
    residual_dtype_for(cfg.train.residual_dtype, gpu_precision, gpu_strategy)
    if cfg.train.recompute_dropout_masks:
        check_recompute_dropout_masks(cfg.train.compile != "off", cfg.model.drop_rate,
                                      cfg.train.activation_checkpointing)
    if cfg.train.compiled_autograd:
        check_compiled_autograd(cfg.train.compile != "off", gpu_strategy, cfg.train.compile_mode)
    if cfg.train.fp8:  # as on a GPU with fp8 tensor cores (the estimate needs no torchao)
        check_fp8_settings(gpu_precision, cfg.train.micro_batch_size * cfg.model.context_length)
    m = cfg.model
    params = count_params(m)
    fpt = flops_per_token(m)
    rows = memory_table(cfg, gpus, gpu_mem_gib)
    mb = cfg.train.micro_batch_size
    per_rank = mb * cfg.train.grad_accum_steps
    room = gpu_mem_gib - CUDA_CONTEXT_GIB  # what the estimate may fill: "fits" below
    budget = room * GIB
    default_prec = "bf16-mixed"
    layout = gpu_layout(cfg, default_prec, gpu_mem_gib, strategy="ddp")
    fit = suggest_micro_batch(m, budget, per_rank, **layout)
    # The verdict's advice is flags for this config: none that its precision would refuse (fp32, bf16-pure).
    mixed = gpu_precision in AUTOCAST_DTYPES
    # What --train.recompute_weight_casts true would make of bf16-mixed DDP, where it is off and would apply.
    recast = None
    if mixed and not layout["recompute_casts"] and recast_applies(default_prec, layout["compiled"], "ddp",
                                                                  cfg.train.activation_checkpointing, layout["fp8"]):
        recast = estimate_training_memory(m, mb, **dict(layout, recompute_casts=True)).total / GIB
    # What --train.residual_dtype compute would make of the verdict's row (DDP, no activation checkpointing; the
    # weight casts recomputed as the run would decide), where the stream is fp32, a 16-bit one saves memory
    # (compiled) and the config's precision can have one.
    half = None
    if mixed and not layout["residual_16bit"] and layout["compiled"]:
        half_layout = gpu_layout(cfg, default_prec, gpu_mem_gib, strategy="ddp", activation_checkpointing=False,
                                 residual_16bit=True)
        half = (estimate_training_memory(m, mb, **half_layout).total / GIB, half_layout["recompute_casts"])
    t = cfg.train
    eval_share = eval_flop_share(t)
    if as_json:
        out = {"config": cfg.to_dict(), "parameters": params, "matmul_parameters": matmul_params(m),
               "flops_per_token": fpt, "eval_flop_share": eval_share, "gpu_mem_gib": gpu_mem_gib, "memory_gib": rows,
               "ddp_bf16_mixed_fit": None if fit is None else {"micro_batch_size": fit[0], "grad_accum_steps": fit[1]},
               "ddp_bf16_mixed_recompute_weight_casts_gib": recast,
               "ddp_bf16_mixed_residual_compute_gib": None if half is None else half[0]}
        emit(out)
        return 0

    log.info("resolved config:\n%s", cfg.to_json())
    if note:
        log.info("%s", note)
    log.info("")
    log.info("parameters:            %s", f"{params:,}")
    log.info("model FLOPs per token: %.3f GFLOP  (6 x %s matmul weights incl. the head + 12 x %d layers x %d "
             "width x %d context)", fpt / 1e9, f"{matmul_params(m):,}", m.n_layers, m.emb_dim, m.context_length)
    log.info("evaluation:            %.1f%% of the model FLOPs (counted: %d forward passes of a micro-batch on each "
             "split every %d steps of %d micro-step%s)%s", 100 * eval_share, t.eval_batches, t.eval_every,
             t.grad_accum_steps, "" if t.grad_accum_steps == 1 else "s",
             "; raise --train.eval_every to train faster" if eval_share > EVAL_SHARE_HINT else "")
    log.info("")
    log.info("training memory per GPU, estimated (GiB), micro-batch %d x context %d; "
             "'ckpt' = activation checkpointing:", mb, m.context_length)
    header = (f"  {'precision':11s} {'strategy':9s} {'ckpt':4s} {'weights':>8s} {'grads':>7s} {'AdamW':>7s} "
              f"{'copies':>7s} {'activ.':>7s} {'logits':>7s} {'total':>7s}  fits {gpu_mem_gib:g} GiB")
    log.info(header)
    for r in rows:
        strategy = "DDP" if r["strategy"] == "ddp" else f"FSDP x{r['gpus']}"
        log.info(f"  {r['precision']:11s} {strategy:9s} {'yes' if r['activation_checkpointing'] else 'no':4s} "
                 f"{r['weights']:8.2f} {r['grads']:7.2f} {r['optimizer']:7.2f} "
                 f"{r['compute_copies']:6.2f}{'*' if r['recompute_casts'] else ' '} "
                 f"{r['activations']:7.2f} {r['logits']:7.2f} {r['total']:7.2f}  "
                 f"{'yes' if r['total'] <= room else 'no'}")
    log.info("")
    log.info("(weights/grads/AdamW: per-rank state, sharded under FSDP; copies: 16-bit weight copies for compute; "
             "activ.: the mixed-precision rows with the residual stream in %s%s; logits: %s; fits: the total and "
             f"~{CUDA_CONTEXT_GIB:g} GiB for the CUDA context.)%s",
             "16 bits (--train.residual_dtype compute)" if cfg.train.residual_dtype == "compute"
             else "fp32 under DDP, in 16 bits under FSDP (--train.residual_dtype)",
             ("; dropout masks: none kept in the rows without 'ckpt' (--train.recompute_dropout_masks)"
              if cfg.train.recompute_dropout_masks else "")
             + ("; --train.fp8: the bf16 rows keep no copies of the blocks' fp8 linears, and FSDP gathers those "
                "whose rows divide over its GPUs in fp8, 1 byte a weight" if cfg.train.fp8 else ""),
             "the chunked head + loss (--train.fused_loss)" if layout["fused_loss"]
             else "the logits as torch.compile keeps them" + (" (fp32 rows: the chunked head + loss)"
                                                             if gpu_layout(cfg, "fp32", gpu_mem_gib)["fused_loss"]
                                                             else "")
             if compiles_head(layout["compiled"], cfg.train.compile_scope)
             else "the full logits in eager mode (--train.fused_loss on would chunk them)",
             "\n(copies*: recast in backward instead of kept, --train.recompute_weight_casts "
             + ("true)" if cfg.train.recompute_weight_casts is True else
                f"auto: the estimate without is over {USABLE_SHARE:.0%} of {gpu_mem_gib:g} GiB)")
             if any(r["recompute_casts"] for r in rows) else "")
    ddp = next(r for r in rows if r["precision"] == default_prec and r["strategy"] == "ddp"
               and not r["activation_checkpointing"])
    context = f"~{CUDA_CONTEXT_GIB:g} GiB of CUDA context"
    over = f"more than {room:g} GiB ({gpu_mem_gib:g} less {context})"
    if ddp["total"] <= room:
        log.info("verdict: %s with DDP fits %g GiB per GPU (%.1f GiB estimated%s, and %s).", default_prec, gpu_mem_gib,
                 ddp["total"], ", with the weight casts recomputed in backward" if ddp["recompute_casts"] else "",
                 context)
        return 0
    if recast is not None and recast <= room:
        log.info("verdict: %s with DDP needs %.1f GiB per GPU at micro-batch %d, %s; with "
                 "--train.recompute_weight_casts true it fits (%.1f GiB estimated).", default_prec, ddp["total"],
                 mb, over, recast)
        return 0
    if half is not None and half[0] <= room:
        log.info("verdict: %s with DDP needs %.1f GiB per GPU at micro-batch %d, %s; with "
                 "--train.residual_dtype compute (the residual stream in 16 bits) it fits (%.1f GiB estimated%s).",
                 default_prec, ddp["total"], mb, over, half[0],
                 ", with the weight casts recomputed in backward" if half[1] else "")
        return 0
    options = [r for r in rows if r["precision"] == default_prec and r["total"] <= room]
    msg = f"verdict: {default_prec} with DDP needs {ddp['total']:.1f} GiB per GPU at micro-batch {mb}: {over}."
    if fit is not None and fit[0] < mb:
        msg += f" DDP fits at micro-batch {fit[0]} x {fit[1]} accumulation steps (same global batch)."
    if options:
        best = min(options, key=lambda r: (r["gpus"], r["activation_checkpointing"]))
        how = f"FSDP over {best['gpus']} GPUs" if best["strategy"] == "fsdp" else "DDP"
        if best["activation_checkpointing"]:
            how += " with activation checkpointing (--train.activation_checkpointing true)"
        msg += f" It fits with {how}: {best['total']:.1f} GiB per GPU (--dist.strategy {best['strategy']})."
    elif fit is None:  # not even micro-batch 1 under DDP
        msg += (f" No listed layout fits, even at a smaller micro-batch; try more GPUs (--gpus) or GPUs with more "
                f"than {gpu_mem_gib:g} GiB.")
    log.info(msg)
    return 0
