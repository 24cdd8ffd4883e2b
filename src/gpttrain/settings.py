"""What a run's settings come to on this process, before any data is prepared or model built: the precision,
strategy and compile choice resolved for its device and world, every refusal those allow (`check_run_settings`),
and the number of optimizer steps (`plan_steps`).
"""

from __future__ import annotations

import math

import torch

from gpttrain.config import Config
from gpttrain.distributed import DistInfo
from gpttrain.errors import ConfigError
from gpttrain.parallel import (
    AUTOCAST_DTYPES,
    check_attention,
    check_compiled_autograd,
    check_recompute_dropout_masks,
    check_recompute_weight_casts,
    compile_wanted,
    residual_dtype_for,
    strategy_for,
)


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


def check_run_settings(cfg: Config, info: DistInfo) -> tuple[str, str, bool]:
    """The refusals a run's settings can get from what this process is (its device, the world), all before any
    data is prepared or model built (`gpttrain train` and `bench` call it first, the Trainer again): precision,
    strategy and compile resolved, fp8, the weight recast, the dropout masks, compiled autograd, the residual
    stream's dtype and the attention kernel (tried once) checked. Returns (precision, strategy, compiled)."""
    precision = resolve_precision(cfg.train.precision, info.device)
    strategy = strategy_for(cfg.dist.strategy, info)
    if cfg.train.fp8:
        from gpttrain.fp8 import check_fp8

        check_fp8(precision, info.device, cfg.train.micro_batch_size * cfg.model.context_length)
    compiled = compile_wanted(cfg.train.compile, info.device)
    if cfg.train.recompute_weight_casts is True:
        check_recompute_weight_casts(precision, compiled, strategy)
    if cfg.train.recompute_dropout_masks:
        check_recompute_dropout_masks(compiled, cfg.model.drop_rate, cfg.train.activation_checkpointing)
    if cfg.train.compiled_autograd:
        check_compiled_autograd(compiled, strategy, cfg.train.compile_mode)
    residual_dtype_for(cfg.train.residual_dtype, precision, strategy)
    compute_dtype = AUTOCAST_DTYPES.get(precision, torch.bfloat16 if precision == "bf16-pure" else None)
    check_attention(cfg.train.attention, info.device, dtype=compute_dtype or torch.float32,
                    head_dim=cfg.model.emb_dim // cfg.model.n_heads, dropout=cfg.model.drop_rate,
                    seq_len=cfg.model.context_length)
    return precision, strategy, compiled


def plan_steps(cfg: Config, batches_per_epoch: int, tokens_per_step: int, *, step: int = 0, tokens: int = 0,
               batches_done: int = 0) -> int:
    """Total optimizer steps from epochs, steps or tokens (the smallest wins; one epoch if none given). A resumed
    run plans what is left at this run's batch from where it stands: `step` steps and `tokens` tokens done, and
    `batches_done` of this run's global batches behind the data's cursor (`WindowLoader.batches_done`); its steps
    so far may have been of another size (another world size or micro-batch)."""
    t = cfg.train
    accum = t.grad_accum_steps
    candidates = []
    if t.max_steps is not None:
        candidates.append(t.max_steps)
    if t.max_tokens is not None:
        candidates.append(step + math.ceil(max(t.max_tokens - tokens, 0) / tokens_per_step))
    if t.epochs is not None or not candidates:
        epochs = t.epochs if t.epochs is not None else 1
        candidates.append(step + max(epochs * batches_per_epoch - batches_done, 0) // accum)
    return max(min(candidates), 1)
