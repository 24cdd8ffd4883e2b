"""Throughput arithmetic: model FLOPs per token, MFU against a table of GPU peaks.

Pure functions, unit-tested; the training loop's reporting builds on them.
"""

from __future__ import annotations

import re

from gpttrain.config import ModelConfig, TrainConfig

# Dense bf16 tensor-core peaks in TFLOP/s per GPU, from the vendors' datasheets (no sparsity).
# Matched against torch.cuda.get_device_name() as whole words (A100 is not the RTX A1000), most specific first.
GPU_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),  # the PCIe card, lower clocks and power than the SXM H200
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A10G", 70.0),  # AWS's A10 variant
    ("A10", 125.0),
    ("A30", 165.0),
    ("A40", 149.7),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 6000 Ada", 364.0),
    ("RTX A6000", 154.8),
    ("RTX 5090", 209.5),
    ("RTX 4090", 165.2),
    ("RTX 4080", 97.5),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16: V100 has no bf16; mixed precision there is fp16
    ("T4", 65.0),  # fp16 likewise
)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights taking part in matrix products: every block's linears plus the output head.

    Embedding lookups, biases and norms are not matrix products and are left out, as in the
    PaLM / nanoGPT accounting; the head counts even when tied (it is still a matmul).
    """
    d = cfg.emb_dim
    return cfg.n_layers * 12 * d * d + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6 x matmul weights (forward + backward) + 12 x layers x width x context
    for attention scores and values (forward + backward)."""
    T = cfg.context_length if seq_len is None else seq_len
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.emb_dim * T


def model_tflops(tokens_per_s: float, cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Achieved model TFLOP/s for a throughput in tokens/s (on however many GPUs produced it)."""
    return tokens_per_s * flops_per_token(cfg, seq_len) / 1e12


def mfu(tokens_per_s_per_gpu: float, cfg: ModelConfig, peak_tflops: float | None,
        seq_len: int | None = None) -> float | None:
    """Model FLOPs utilization of one GPU; None where the peak is unknown (never invented)."""
    if peak_tflops is None or peak_tflops <= 0:
        return None
    return model_tflops(tokens_per_s_per_gpu, cfg, seq_len) / peak_tflops


EVAL_SHARE_HINT = 0.10  # evaluation's share of the time over which the loop (measured) and info (counted) say so


def eval_time_share(per_eval: float, per_step: float, eval_every: int) -> float:
    """Evaluation's share of the time when one evaluation of `per_eval` follows every `eval_every` steps of
    `per_step` each (seconds, or any unit both share); 0 where neither takes any."""
    total = per_eval + eval_every * per_step
    return per_eval / total if total > 0 else 0.0


def eval_flop_share(train: TrainConfig) -> float:
    """Evaluation's share of a run's model FLOPs at its cadence, counted: --train.eval_batches forward passes of
    a micro-batch on each split every --train.eval_every steps, each step --train.grad_accum_steps micro-steps
    of forward and backward (3 forwards' worth). Model FLOPs leave out activation checkpointing's recomputed
    blocks, so there the share of the compute is lower; and where a split has fewer windows than the
    evaluation asks for, lower too."""
    return eval_time_share(2 * train.eval_batches, train.grad_accum_steps * 3, train.eval_every)


def lookup_peak_tflops(device_name: str | None) -> float | None:
    """The bf16 dense peak of a GPU by name, or None where it is not in the table (or on CPU)."""
    if not device_name:
        return None
    name = device_name.upper()
    for key, peak in GPU_BF16_PEAK_TFLOPS:
        if re.search(rf"(?<![A-Z0-9]){re.escape(key.upper())}(?![A-Z0-9])", name):
            return peak
    return None
