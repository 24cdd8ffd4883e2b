"""Training-memory estimates per GPU: weights, gradients, AdamW state, activations, logits.

An estimate from the config alone, so `gpttrain info` can tell a user before any run whether a
model fits and how (precision, DDP vs FSDP over N GPUs, micro-batch, activation checkpointing).
Activation bytes follow the per-layer accounting of Korthikanti et al. (2022) with SDPA/flash
attention (no T^2 term), adjusted for what PyTorch's autocast saves (LayerNorm inputs in fp32).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from gpttrain.config import ModelConfig
from gpttrain.fp8 import FP8_PRECISIONS, converts, gathers_in_fp8, takes_tokens
from gpttrain.loss import chunk_rows_for, chunked_loss_wanted, compiles_head
from gpttrain.metrics import matmul_params
from gpttrain.model import count_params
from gpttrain.parallel import AUTOCAST_DTYPES, residual_is_16bit

GIB = 1024**3

# (weight, grad, AdamW state) bytes per parameter held by each rank before sharding.
_STATE_BYTES = {
    "fp32": (4, 4, 8),
    "bf16-mixed": (4, 4, 8),  # fp32 master weights and grads, fp32 moments
    "fp16-mixed": (4, 4, 8),
    "bf16-pure": (2, 2, 4),  # the original script: everything in bf16, moments too
}


@dataclass
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    compute_copies: float  # low-precision weight copies (autocast cache / FSDP all-gathered blocks)
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.compute_copies + self.activations + self.logits

    def as_gib(self) -> dict[str, float]:
        d = {k: v / GIB for k, v in asdict(self).items()}
        d["total"] = self.total / GIB
        return d


def _activation_bytes_per_token_layer(cfg: ModelConfig, precision: str, norm_inputs_16bit: bool = False,
                                      masks_kept: bool = True) -> float:
    """Bytes saved for backward per token per block, in units of emb_dim. `masks_kept`: False where the dropout
    masks are drawn again in backward (`--train.recompute_dropout_masks`)."""
    masks = 2 if cfg.drop_rate > 0 and masks_kept else 0  # attention-output and MLP dropout masks (1 byte each)
    # 16 saved tensors of width emb_dim per token: LN inputs (2), LN outputs fed to qkv/fc (2),
    # q, k, v, attention output (4), MLP hidden before/after GELU (2 x 4).
    if precision == "fp32":
        return 16 * 4 + masks
    if precision == "bf16-pure":
        return 16 * 2 + masks
    # autocast: LayerNorm runs in fp32, so its two inputs (the residual stream) are saved in fp32, the rest in 16
    # bits; `norm_inputs_16bit`: a 16-bit stream that torch.compile saves as it is (and casts again in backward).
    return 14 * 2 + 2 * (2 if norm_inputs_16bit else 4) + masks


# What a GPU's memory holds beside the tensors the estimate counts: the CUDA context and cuBLAS's workspaces (about
# 0.5-1 GiB). `gpttrain info` counts it in what fits.
CUDA_CONTEXT_GIB = 1.0

# The share of a GPU's memory a run's estimate may fill; the rest is for the CUDA context, cuBLAS's workspaces
# and the allocator's fragmentation. The trainer's OOM advice and `--train.recompute_weight_casts auto` use it.
USABLE_SHARE = 0.9


def fp8_block_weights(cfg: ModelConfig, fsdp_world_size: int = 0) -> tuple[int, int]:
    """Per block, the weights of the linears `--train.fp8` makes fp8 (`fp8.convert_to_fp8`: both dims divisible by
    16) and of those FSDP2 over `fsdp_world_size` ranks gathers in fp8 (rows dividing over the ranks; 0: none)."""
    d = cfg.emb_dim
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]  # (out, in): attn.qkv, attn.proj, mlp.fc, mlp.proj
    fp8 = [(o, i) for o, i in shapes if converts(o, i)]
    return sum(o * i for o, i in fp8), sum(o * i for o, i in fp8 if gathers_in_fp8(o, fsdp_world_size))


def recast_applies(precision: str, compiled: bool, strategy: str, activation_checkpointing: bool,
                   fp8: bool) -> bool:
    """Whether recomputing the weight casts (`--train.recompute_weight_casts`) saves memory in such a run: mixed
    precision under torch.compile, whose partitioner otherwise keeps every linear's 16-bit copy; not under FSDP
    (which keeps no copy between forward and backward), activation checkpointing (which recasts already) or fp8
    (whose linears cast their own weights)."""
    return (precision in AUTOCAST_DTYPES and compiled and strategy != "fsdp"
            and not activation_checkpointing and not fp8)


def run_layout(model: ModelConfig, train, precision: str, compiled: bool, gpu_bytes: float, **overrides) -> dict:
    """`estimate_training_memory`'s keywords for a GPU run of `model` with `train` (the config's TrainConfig) in
    `precision`, compiled or not, on GPUs of `gpu_bytes`: the loss `--train.fused_loss` picks there and whether
    the weight casts are recomputed; `overrides` (strategy, world_size, activation_checkpointing, recompute_casts)
    on top; `recompute_dropout` is `--train.recompute_dropout_masks`. `--train.recompute_weight_casts auto`
    recomputes the casts where that applies (`recast_applies`) and the estimate without it is over USABLE_SHARE
    of `gpu_bytes` (never where `gpu_bytes` is 0: no GPU). `gpttrain info`, the trainer and its OOM message share
    it."""
    head = compiles_head(compiled, train.compile_scope)
    layout = dict(precision=precision, compiled=compiled, compile_scope=train.compile_scope,
                  fused_loss=chunked_loss_wanted(train.fused_loss, "cuda", precision, head),
                  activation_checkpointing=train.activation_checkpointing, recompute_casts=False)
    layout["recompute_dropout"] = train.recompute_dropout_masks
    layout.update(overrides)
    layout.setdefault("fp8", train.fp8 and layout["precision"] in FP8_PRECISIONS)
    layout.setdefault("residual_16bit", residual_is_16bit(train.residual_dtype, precision,
                                                          layout.get("strategy", "ddp")))
    if "recompute_casts" not in overrides:
        setting = train.recompute_weight_casts
        if setting == "auto":
            layout["recompute_casts"] = (
                gpu_bytes > 0
                and recast_applies(precision, compiled, layout.get("strategy", "ddp"),
                                   layout["activation_checkpointing"], layout["fp8"])
                and estimate_training_memory(model, train.micro_batch_size, **layout).total > USABLE_SHARE * gpu_bytes)
        else:
            layout["recompute_casts"] = setting
    return layout


def estimate_training_memory(
    cfg: ModelConfig,
    micro_batch_size: int,
    precision: str = "bf16-mixed",
    strategy: str = "ddp",
    world_size: int = 1,
    activation_checkpointing: bool = False,
    seq_len: int | None = None,
    fused_loss: bool = False,
    compiled: bool = False,
    compile_scope: str = "model",
    recompute_casts: bool = False,
    residual_16bit: bool | None = None,
    recompute_dropout: bool = False,
    fp8: bool = False,
) -> MemoryEstimate:
    """Peak bytes per GPU of one training step (before allocator fragmentation and CUDA context).

    `fused_loss`: the chunked head + cross-entropy (`--train.fused_loss`), whose logits take one chunk at a time;
    off, the plain head's full logits, as eager autograd keeps them or as torch.compile does where it compiles
    the head (`compiled` with `compile_scope` "model"). Mixed precision keeps a 16-bit copy of every linear
    weight from forward to backward, except, compiled, with `recompute_casts` (`--train.recompute_weight_casts`)
    or activation checkpointing: then the copies are made again in backward and about one block's is held.
    `residual_16bit`: the residual stream in the compute dtype (`--train.residual_dtype`), not fp32; None: as
    `auto` makes it (16 bits under FSDP). Eager autograd saves autocast's fp32 copies of LayerNorm's inputs even
    so: only a compiled run saves them in 16 bits. `recompute_dropout`: the blocks' dropout masks drawn again in
    backward (`--train.recompute_dropout_masks`), which a compiled run without activation checkpointing does not
    keep. `fp8`: the blocks' linears in fp8 (`--train.fp8`, bf16 precisions only): they keep no 16-bit weight
    copy (torchao's Float8Linear saves the master weight itself and casts it again in backward), and FSDP holds
    the weights it gathers in fp8 at 1 byte each; their activations are counted as bf16 ones (what eager
    autograd keeps on CUDA; compiled, on CPU it keeps fewer)."""
    if precision not in _STATE_BYTES:
        raise ValueError(f"unknown precision {precision!r}")
    if fp8 and precision not in FP8_PRECISIONS:
        raise ValueError(f"fp8 needs a bf16 precision, not {precision!r}")
    P = count_params(cfg)
    T = cfg.context_length if seq_len is None else seq_len
    d, L, V = cfg.emb_dim, cfg.n_layers, cfg.vocab_size
    tokens = micro_batch_size * T
    wb, gb, ob = _STATE_BYTES[precision]
    shard = world_size if strategy == "fsdp" else 1
    weights, grads, optimizer = wb * P / shard, gb * P / shard, ob * P / shard

    half = precision in AUTOCAST_DTYPES
    block_params = (count_params(cfg) - 2 * d - V * d * (1 if cfg.tie_embeddings else 2) - T * d) / max(L, 1)
    fp8_weights, fp8_gathered = (fp8_block_weights(cfg, world_size if strategy == "fsdp" else 0) if fp8
                                 else (0, 0))
    if strategy == "fsdp" and world_size > 1:
        # Unsharded working copies: the root (embeddings, head) plus about two blocks in flight
        # (the one computing and the one being prefetched), in the compute dtype; fp8-gathered weights in 1 byte.
        cdt = 2 if precision != "fp32" else 4
        root = V * d * (1 if cfg.tie_embeddings else 2) + T * d
        compute_copies = cdt * (root + 2 * block_params) - (cdt - 1) * 2 * fp8_gathered
    elif half and compiled and (recompute_casts or activation_checkpointing):
        # One block's (or the head's) copies, made in backward.
        compute_copies = 2 * max(block_params - fp8_weights, V * d)
    elif half:
        # The linears' 16-bit weights (embeddings are looked up in fp32); fp8 linears keep none.
        compute_copies = 2 * (matmul_params(cfg) - L * fp8_weights)
    else:
        compute_copies = 0.0

    if residual_16bit is None:
        residual_16bit = residual_is_16bit("auto", precision, strategy)
    stream_16bit = precision == "bf16-pure" or (residual_16bit and half)
    resid = 2 if stream_16bit else 4  # the residual stream's dtype
    # LayerNorm inputs, saved as autocast's fp32 copies of a 16-bit stream except where torch.compile compiled them.
    per_layer = _activation_bytes_per_token_layer(cfg, precision, stream_16bit and compiled,
                                                  masks_kept=not (recompute_dropout and compiled
                                                                  and not activation_checkpointing))
    final_norm_in = 2 if stream_16bit and (precision == "bf16-pure" or compiles_head(compiled, compile_scope)) else 4
    if activation_checkpointing:
        # Each block keeps only its input; one block's activations are live during its recompute.
        activations = tokens * d * (L * resid + per_layer)
    else:
        activations = tokens * d * L * per_layer
    # The final LayerNorm's input and fp32 output, the embeddings' dropout mask.
    activations += tokens * d * (final_norm_in + (1 if cfg.drop_rate > 0 else 0) + 4)

    if fused_loss:
        logits = fused_loss_bytes(tokens, V, d, precision)
    elif compiles_head(compiled, compile_scope):
        logits = compiled_loss_bytes(tokens, V, d, precision)
    else:
        # Logits: the head's output, its fp32 copy for the loss, log-softmax saved for backward,
        # and the fp32 gradient of the logits at the start of backward.
        logit_bytes = {"fp32": 4 + 4 + 4, "bf16-pure": 2 + 4 + 4 + 4}.get(precision, 2 + 4 + 4 + 4)
        logits = tokens * V * logit_bytes
    return MemoryEstimate(weights, grads, optimizer, compute_copies, activations, logits)


def fused_loss_bytes(tokens: int, vocab: int, width: int, precision: str, rows: int | None = None) -> int:
    """Peak bytes of the chunked head + loss (loss.py) beyond its inputs, an upper bound (checked against the
    profiler in the tests): one chunk's fp32 logits with logsumexp's temporary and their copy in the compute
    dtype; the head's fp32 weight-gradient accumulator with a (vocab, width) matmul result and its conversion;
    the gradient of the hidden states; under autocast, 16-bit copies of the weight and the hidden states."""
    rows = min(tokens, rows or chunk_rows_for(vocab))
    cdt = 4 if precision == "fp32" else 2  # the compute dtype
    pc = 0 if precision == "fp32" else 2  # the probabilities' copy in the compute dtype
    cast = 2 if precision in AUTOCAST_DTYPES else 0  # autocast's 16-bit copies of fp32 inputs
    h = 2 if precision == "bf16-pure" else 4  # the hidden states' dtype (the final LayerNorm's output)
    return rows * vocab * (8 + pc) + vocab * width * (4 + cdt + 4 + cast) + tokens * width * (h + cast)


def compiled_loss_bytes(tokens: int, vocab: int, width: int, precision: str) -> int:
    """Peak bytes of the plain head + cross-entropy under torch.compile beyond its inputs, an upper bound (checked
    against the profiler in the tests): inductor saves the logits in the compute dtype and writes their gradient
    over them; the head's weight gradient and the hidden states' gradient; under autocast, 16-bit copies of the
    weight and the hidden states."""
    cdt = 4 if precision == "fp32" else 2
    cast = 2 if precision in AUTOCAST_DTYPES else 0
    h = 2 if precision == "bf16-pure" else 4
    return tokens * vocab * cdt + vocab * width * (4 + cast) + tokens * width * (h + cast)


def _divisors(n: int) -> list[int]:
    """The divisors of n, largest first (pairs up to its square root: instant even for an absurd batch)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)}, reverse=True)


def suggest_micro_batch(cfg: ModelConfig, budget_bytes: float, global_per_rank: int, **kw) -> tuple[int, int] | None:
    """The largest micro-batch dividing `global_per_rank` (sequences per rank per step) that fits
    `budget_bytes`, with the accumulation steps that keep the global batch; None if even 1 does not fit. With
    `fp8`, only micro-batches whose tokens fp8 matmuls take (a multiple of 16: `fp8.check_fp8_settings`)."""
    tokens = cfg.context_length if kw.get("seq_len") is None else kw["seq_len"]
    for mb in _divisors(global_per_rank):
        if kw.get("fp8") and not takes_tokens(mb * tokens):
            continue
        if estimate_training_memory(cfg, mb, **kw).total <= budget_bytes:
            return mb, global_per_rank // mb
    return None


def oom_message(model: ModelConfig, train, precision: str, compiled: bool, recast: bool, layout: dict,
                gpu_bytes: int) -> str:
    """The trainer's words for a CUDA out-of-memory error: this estimate against the GPU's `gpu_bytes`, the
    micro-batch that would fit at the same global batch (or the bigger levers), and each memory flag that
    applies to this run, `layout` (its `run_layout`, casts recomputed as `recast`), with what it would save."""
    mb = train.micro_batch_size
    est = estimate_training_memory(model, mb, **layout)
    fit = suggest_micro_batch(model, USABLE_SHARE * gpu_bytes, mb * train.grad_accum_steps, **layout)
    msg = (f"CUDA out of memory at --train.micro_batch_size {mb} "
           f"(gpttrain info estimates {est.total / GIB:.1f} GiB per GPU; this GPU has {gpu_bytes / GIB:.1f} GiB).")
    if fit is not None and fit[0] < mb:
        msg += f" Try --train.micro_batch_size {fit[0]} --train.grad_accum_steps {fit[1]} (same global batch)."
    else:
        msg += " Try --train.activation_checkpointing true, --dist.strategy fsdp over more GPUs, or a smaller model."

    def with_(**change) -> MemoryEstimate:
        return estimate_training_memory(model, mb, **dict(layout, **change))

    def saving(flag: str, other: MemoryEstimate) -> str:
        return f" {flag} would save about {(est.total - other.total) / GIB:.1f} GiB."

    # The recast's hint only where it saves much: activation checkpointing already recasts in backward, and fp8
    # linears cast their own weights (the head alone would be recast).
    if not recast and recast_applies(precision, compiled, layout["strategy"], train.activation_checkpointing,
                                     layout["fp8"]):
        msg += saving("--train.recompute_weight_casts true", with_(recompute_casts=True))
    if (model.drop_rate > 0 and compiled and not train.activation_checkpointing
            and not train.recompute_dropout_masks):
        msg += saving("--train.recompute_dropout_masks true", with_(recompute_dropout=True))
    if precision in AUTOCAST_DTYPES and not layout["residual_16bit"]:
        half = with_(residual_16bit=True)
        if half.total < est.total:  # eager autograd keeps fp32 copies of the LayerNorm inputs either way
            msg += saving("--train.residual_dtype compute", half)
    return msg
