"""Float8 training of the transformer blocks' linears through torchao (`--train.fp8`).

Why: on GPUs with fp8 tensor cores (H100, Ada) the blocks' matmuls run at up to twice the bf16 rate. Only
the nn.Linear layers inside `model.blocks` become torchao's Float8Linear (dynamic tensorwise scaling, the
default recipe); the output head and the embeddings stay in high precision, where fp8 costs the most accuracy.
Float8Linear keeps `weight` and `bias` as plain parameters, so parameter names, state_dict keys and checkpoints
are those of the model without fp8 (either loads into the other). torchao is optional: imported only here,
and only when fp8 is asked for.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from gpttrain.errors import ConfigError

log = logging.getLogger("gpttrain")

FP8_PRECISIONS = ("bf16-mixed", "bf16-pure")
MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) are the first with fp8 tensor cores
FP8_DIM_MULTIPLE = 16  # the fp8 matmul kernels (torch._scaled_mm) need both dims of the weight divisible by 16


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise loggers to ERROR for a moment: importing torchao logs warnings that are noise here (see below)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _import_float8() -> tuple[Any, Callable[..., nn.Module], type[nn.Linear]]:
    """torchao's (Float8LinearConfig, convert_to_float8_training, Float8Linear), or a ConfigError."""
    try:
        # torchao warns "Failed to load ..." for optional CUDA kernels (mxfp8, cutlass) that Float8Linear does not
        # use, and torch warns about one of its enums; neither is something a user can act on.
        with _quiet_loggers("torchao", "torch.utils._pytree"):
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
            from torchao.float8.float8_linear import Float8Linear
    except Exception as e:  # not installed (ImportError), or a torchao that does not match this torch
        raise ConfigError(f'--train.fp8: needs torchao, which cannot be imported ({type(e).__name__}: '
                          f'{str(e).splitlines()[0] if str(e) else ""}); pip install "gpttrain[fp8]" (tested with '
                          f'torchao 0.18) or drop --train.fp8') from e
    return Float8LinearConfig, convert_to_float8_training, Float8Linear


def takes_tokens(tokens_per_micro_batch: int) -> bool:
    """Whether fp8 matmuls take a micro-batch of this many tokens (the weight gradient's contracts over them)."""
    return tokens_per_micro_batch % FP8_DIM_MULTIPLE == 0


def check_fp8_settings(precision: str, tokens_per_micro_batch: int | None = None) -> None:
    """`check_fp8`'s refusals that need neither a device nor torchao (what `gpttrain info` checks)."""
    if tokens_per_micro_batch is not None and not takes_tokens(tokens_per_micro_batch):
        # The weight gradient's fp8 matmul contracts over the tokens: CUDA's _scaled_mm wants a multiple of 16.
        raise ConfigError(f"--train.fp8: a micro-batch of {tokens_per_micro_batch} tokens (--train.micro_batch_size "
                          f"x --model.context_length) is not a multiple of {FP8_DIM_MULTIPLE}, which fp8 matmuls "
                          f"need; change either, or drop --train.fp8")
    if precision not in FP8_PRECISIONS:
        raise ConfigError(f"--train.fp8: needs bf16 compute, but --train.precision is {precision}; "
                          f"use --train.precision bf16-mixed (or bf16-pure) or drop --train.fp8")


def check_fp8(precision: str, device: torch.device, tokens_per_micro_batch: int | None = None) -> None:
    """Refuse `--train.fp8` where it cannot run, with one line naming the flag, the value and what to do.

    `precision` is the resolved one (not "auto"). fp8 needs a bf16 compute dtype around it: bf16-mixed (fp32
    master weights under bf16 autocast) or bf16-pure. On CUDA it needs fp8 tensor cores (compute capability 8.9+);
    on CPU it runs (torch's CPU _scaled_mm), slowly: that is how the tests run. One process, DDP and FSDP2 all
    work (FSDP2 checked on 2 and 3 gloo ranks against one process), provided `convert_to_fp8` runs before `fully_shard`.
    """
    check_fp8_settings(precision, tokens_per_micro_batch)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            raise ConfigError(f"--train.fp8: {name} (compute capability {capability[0]}.{capability[1]}) has no fp8 "
                              f"tensor cores; fp8 needs an H100, an Ada GPU (RTX 40xx, L4, L40) or newer; "
                              f"drop --train.fp8")
    elif device.type != "cpu":
        raise ConfigError(f"--train.fp8: fp8 matmuls are not available on {device.type}; "
                          f"run on a CUDA GPU (H100, Ada or newer) or drop --train.fp8")
    _import_float8()


def converts(out_features: int, in_features: int) -> bool:
    """Whether `convert_to_fp8` makes a block's linear of this shape fp8: both dims divisible by 16."""
    return out_features % FP8_DIM_MULTIPLE == 0 and in_features % FP8_DIM_MULTIPLE == 0


def gathers_in_fp8(out_features: int, fsdp_world_size: int) -> bool:
    """Whether FSDP2 over `fsdp_world_size` ranks gathers a converted linear's weight in fp8: its rows divide
    evenly over the ranks (see `convert_to_fp8`)."""
    return fsdp_world_size > 0 and out_features % fsdp_world_size == 0


def convert_to_fp8(model: nn.Module, fsdp_world_size: int = 0) -> int:
    """Swap the nn.Linear layers inside `model.blocks` for torchao's Float8Linear, in place; return how many.

    Only layers whose in and out features are both divisible by 16 are swapped (the others stay as they are);
    the output head and the embeddings are never touched. Works on the meta device, so it fits FSDP's build:
    call it before `fully_shard`, DDP or torch.compile. Calling it again converts nothing more (returns 0).

    `fsdp_world_size` (FSDP2 over that many ranks; 0: not sharded): each rank casts its shard of a converted
    weight to fp8 before the all-gather, so FSDP moves and holds 1 byte per weight instead of bf16's 2, and the
    matmul takes the gathered fp8 weight as it is. Only for weights whose rows divide evenly over the ranks:
    torchao's fp8 all-gather sends each rank's shard unpadded, so an uneven split would gather mismatched sizes
    (gloo fails, NCCL may hang); the others are gathered in bf16 and cast after. Those weights become torchao's
    WeightWithDynamicFloat8CastTensor; `plain_fp8_state` turns a state dict of them back into plain tensors, and
    `refresh_fsdp_scales` computes their scales in one all-reduce.
    """
    Float8LinearConfig, convert_to_float8_training, Float8Linear = _import_float8()
    converted: list[str] = []
    gathered: list[str] = []

    def eligible(module: nn.Module, fqn: str) -> bool:
        return (isinstance(module, nn.Linear) and not isinstance(module, Float8Linear)
                and converts(module.out_features, module.in_features))

    def even(module: nn.Module, fqn: str) -> bool:
        ok = eligible(module, fqn) and gathers_in_fp8(module.out_features, fsdp_world_size)
        if ok:
            gathered.append(fqn)
        return ok

    def rest(module: nn.Module, fqn: str) -> bool:
        ok = eligible(module, fqn)
        if ok:
            converted.append(fqn)
        return ok

    if fsdp_world_size > 0:
        convert_to_float8_training(model.blocks, module_filter_fn=even,
                                   config=Float8LinearConfig(enable_fsdp_float8_all_gather=True))
    convert_to_float8_training(model.blocks, module_filter_fn=rest, config=Float8LinearConfig())
    if fsdp_world_size > 0 and converted:
        log.info("fp8: %d of %d fp8 linears gather their weights in fp8; the rows of the others (%s) do not divide "
                 "over %d ranks, so FSDP gathers them in bf16", len(gathered), len(gathered) + len(converted),
                 ", ".join(sorted({name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in converted})),
                 fsdp_world_size)
    return len(gathered) + len(converted)


def _is_fp8_weight(t: Any) -> bool:
    """torchao's weight wrapper for fp8 all-gathers, by name (so this never imports torchao)."""
    return type(t).__name__ == "WeightWithDynamicFloat8CastTensor" and type(t).__module__.startswith("torchao")


def plain_fp8_state(state: Any) -> Any:
    """`state` (a state dict, or a nested one as DCP's optimizer state) with every fp8 all-gather weight, bare or
    as the local shard of a DTensor, replaced by the plain tensor it wraps (the same storage, no copy); the rest as
    it is, and `state` itself where it holds none. What sharded checkpoints save, so they are those of the plain
    model: loadable without torchao."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        new = {k: plain_fp8_state(v) for k, v in state.items()}
        return state if all(new[k] is v for k, v in state.items()) else new
    if isinstance(state, (list, tuple)):
        items = [plain_fp8_state(v) for v in state]
        return state if all(a is b for a, b in zip(items, state)) else type(state)(items)
    if isinstance(state, DTensor) and _is_fp8_weight(state._local_tensor):
        return DTensor.from_local(state._local_tensor._tensor, state.device_mesh, state.placements,
                                  run_check=False, shape=state.shape, stride=state.stride())
    if _is_fp8_weight(state):
        return state._tensor
    return state


def refresh_fsdp_scales(model: nn.Module) -> None:
    """Compute the fp8 scale of every fp8 all-gather weight from its current values, for all of them in one
    all-reduce (otherwise each weight's all-gather does its own). Call it after each optimizer step and after
    the weights are loaded or set, so forward always casts with the scales of the weights it gathers."""
    if not any(_is_fp8_weight(getattr(p, "_local_tensor", p)) for p in model.parameters()):
        return
    with _quiet_loggers("torchao", "torch.utils._pytree"):
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def has_fp8_layers(model: nn.Module) -> bool:
    """Whether any of `model`'s layers is (or derives from) torchao's Float8Linear, wherever torchao keeps that
    class; by name, so this never imports torchao."""
    return any(c.__name__ == "Float8Linear" and c.__module__.startswith("torchao")
               for m in model.modules() for c in type(m).__mro__)
