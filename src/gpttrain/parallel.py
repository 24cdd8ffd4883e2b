"""Wrap the model from outside: activation checkpointing, torch.compile, DDP, FSDP2.

The model's parameter names never change here (no wrapper modules inside it), so checkpoints are
saved from the unwrapped module with plain names.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from gpttrain.config import ModelConfig
from gpttrain.distributed import DistInfo
from gpttrain.model import GPT, fill_

# The 16-bit compute dtype of each mixed precision (fp32 master weights); none for fp32 and bf16-pure.
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def _checkpointed_forward(block_forward, x, cache=None):
    if cache is not None or not torch.is_grad_enabled():
        return block_forward(x, cache)  # decoding and evaluation: nothing to save for backward
    return checkpoint(block_forward, x, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (per-block granularity)."""
    for block in model.blocks:
        block.forward = functools.partial(_checkpointed_forward, block.forward)


def compile_wanted(setting: str, device: torch.device) -> bool:
    if setting == "on":
        return True
    if setting == "off":
        return False
    return device.type == "cuda" and sys.platform.startswith("linux")


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def strategy_for(requested: str, info: DistInfo) -> str:
    """`auto`: DDP with more than one process; FSDP only when asked (it is the answer to memory, not speed)."""
    if not info.distributed:
        return "single"
    return "fsdp" if requested == "fsdp" else "ddp"


def build_fsdp_model(cfg: ModelConfig, info: DistInfo, precision: str, activation_checkpointing: bool) -> GPT:
    """FSDP2: `fully_shard` on each block, then the root; built on the meta device and initialised shard
    by shard, so no rank ever holds the full fp32 model (only one full parameter at a time)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    compute = AUTOCAST_DTYPES.get(precision)
    # Parameters gathered in the compute dtype, gradients reduced in fp32: fp32 master weights stay sharded.
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    with torch.device("meta"):
        model = GPT(cfg)
    if precision == "bf16-pure":
        model.to(torch.bfloat16)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=info.device)
    init_sharded(model, mesh)
    return model


@torch.no_grad()
def init_sharded(model: GPT, mesh) -> None:
    """The same values as `GPT.init_weights` on one device: each full parameter is drawn in the same
    order from the same generator, then each rank keeps its shard (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    for name, p in model.named_parameters():
        full = fill_(torch.empty(p.shape, dtype=p.dtype, device=p.device), *model.init_rule(name))
        p.copy_(distribute_tensor(full, mesh, p.placements, src_data_rank=None))
        del full
