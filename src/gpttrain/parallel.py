"""Wrap the model from outside: activation checkpointing, torch.compile, DDP (FSDP2 in its own step).

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

from gpttrain.distributed import DistInfo


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
