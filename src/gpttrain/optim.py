"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from gpttrain.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrix weights (linears, an untied head); not biases, norms or embeddings.

    Parameters are deduplicated, so a tied head/embedding appears once (in the no-decay group).
    """
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or "emb" in name.split(".")[-2]:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    # Fused AdamW (CUDA and CPU kernels): one kernel per parameter group, and it can skip a step on the device
    # (found_inf), which keeps the training step free of host syncs.
    fused = cfg.fused == "on" or (cfg.fused == "auto" and device.type in ("cuda", "cpu"))
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused or None)


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0,
          schedule: str = "cosine", min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup over `warmup_steps`, then
    constant or cosine from `base_lr` down to `base_lr * min_lr_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    floor = base_lr * min_lr_ratio
    return floor + 0.5 * (base_lr - floor) * (1.0 + math.cos(math.pi * progress))
