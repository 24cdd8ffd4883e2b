"""Wrap the model from outside: activation checkpointing, torch.compile, DDP, FSDP2, the attention kernel.

The model's parameter names never change here (no wrapper modules inside it), so checkpoints are
saved from the unwrapped module with plain names.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from gpttrain.config import ModelConfig
from gpttrain.distributed import DistInfo
from gpttrain.errors import ConfigError
from gpttrain.model import GPT, build_model, fill_

# The 16-bit compute dtype of each mixed precision (fp32 master weights); none for fp32 and bf16-pure.
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def residual_is_16bit(setting: str, precision: str, strategy: str) -> bool:
    """Whether a run's residual stream is in the 16-bit compute dtype (`--train.residual_dtype` `setting`): only
    under bf16/fp16-mixed; always under FSDP, whose mixed-precision policy casts every block's input to the compute
    dtype (FSDP2's cast_forward_inputs); else with `compute`."""
    return precision in AUTOCAST_DTYPES and (setting == "compute" or strategy == "fsdp")


def residual_dtype_for(setting: str, precision: str, strategy: str) -> torch.dtype | None:
    """What `GPT.residual_dtype` is set to for a run: the residual stream's dtype under mixed precision, None in
    fp32 and bf16-pure (one dtype throughout), where an explicit setting is refused rather than ignored, as fp32 is
    under FSDP, which would cast the stream back to 16 bits at every block."""
    compute = AUTOCAST_DTYPES.get(precision)
    if compute is None:
        if setting != "auto":
            raise ConfigError(f"--train.residual_dtype {setting}: this run's precision is {precision}, which has "
                              "one dtype throughout; the residual stream's dtype is a choice of --train.precision "
                              "bf16-mixed or fp16-mixed (leave it auto)")
        return None
    if setting == "fp32" and strategy == "fsdp":
        raise ConfigError("--train.residual_dtype fp32: FSDP casts every block's input to its 16-bit compute dtype, "
                          "so its residual stream is in that dtype whatever this says; use auto or compute")
    return compute if residual_is_16bit(setting, precision, strategy) else torch.float32


def _checkpointed_forward(block_forward, x, cache=None):
    if cache is not None or not torch.is_grad_enabled():
        return block_forward(x, cache)  # decoding and evaluation: nothing to save for backward
    return checkpoint(block_forward, x, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (per-block granularity)."""
    for block in model.blocks:
        block.forward = functools.partial(_checkpointed_forward, block.forward)


def _cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype)


def _recast_linear_forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and torch.is_grad_enabled():
        dtype = torch.get_autocast_dtype(dev)
        if linear.weight.dtype != dtype:
            # The cast alone in a checkpoint region: torch.compile tags it to be recomputed, so backward casts
            # the fp32 weight again instead of keeping its 16-bit copy from forward to backward.
            weight = checkpoint(_cast, linear.weight, dtype, use_reentrant=False)
            return F.linear(x, weight, linear.bias)
    return F.linear(x, linear.weight, linear.bias)


def recompute_weight_casts(model: nn.Module) -> None:
    """`--train.recompute_weight_casts`: each plain linear's 16-bit weight copy (autocast's cast of the fp32
    master weight) is made again in backward instead of being kept from forward to backward: 2 bytes per linear
    weight less while a step's activations are all held (the start of backward, the peak of a run whose
    activations outweigh its gradients), for one more cast per micro-step. Takes effect under torch.compile,
    whose partitioner otherwise saves every copy (eager autograd keeps them whatever this does); fp8 linears
    cast their own weights and are left alone. Parameter names and values are unchanged."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = functools.partial(_recast_linear_forward, module)


def check_recompute_weight_casts(precision: str, compiled: bool, strategy: str) -> None:
    """Refuse `--train.recompute_weight_casts` where it could do nothing, rather than let it be a silent no-op."""
    flag = "--train.recompute_weight_casts true"
    if precision not in AUTOCAST_DTYPES:
        raise ConfigError(f"{flag}: precision {precision} makes no 16-bit copies of the weights; it is for "
                          "--train.precision bf16-mixed or fp16-mixed")
    if not compiled:
        raise ConfigError(f"{flag} needs torch.compile (--train.compile on): without it autograd keeps the "
                          "16-bit weight copies whatever this flag says")
    if strategy == "fsdp":
        raise ConfigError(f"{flag}: FSDP already gathers the weights in 16 bits for each block's forward and "
                          "again for its backward, keeping no copy in between; drop the flag")


def _recomputed_dropout_forward(drop: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    if drop.training and drop.p > 0 and torch.is_grad_enabled():
        # The dropout alone in a checkpoint region: torch.compile tags its random mask to be recomputed, so its
        # backward draws the same numbers again from the seeds inductor keeps, instead of keeping the mask.
        return checkpoint(F.dropout, x, drop.p, True, use_reentrant=False)
    return nn.Dropout.forward(drop, x)


def recompute_dropout_masks(model: nn.Module) -> None:
    """`--train.recompute_dropout_masks`: each transformer block's dropout masks (after the attention projection
    and after the MLP) are drawn again in backward from their seeds instead of being kept from forward to backward:
    2 bytes per token and width per block less memory (0.75 GiB at 1.42B, micro-batch 8), for drawing those random
    numbers twice. The numbers are the same (inductor's generator is counter-based: a seed and each element's
    index), so a run's losses and gradients are what they are without it. Takes effect under torch.compile; in
    eager autograd (and in a compiled block that breaks its graph there) a checkpoint keeps the dropout's input,
    which is larger than its mask. The embeddings' dropout, one mask for the whole model, is left as it is (it
    runs eager under `--train.compile_scope blocks`)."""
    for block in model.blocks:
        for module in block.modules():
            if type(module) is nn.Dropout:
                module.forward = functools.partial(_recomputed_dropout_forward, module)


def check_recompute_dropout_masks(compiled: bool, drop_rate: float, activation_checkpointing: bool) -> None:
    """Refuse `--train.recompute_dropout_masks true` where it could do nothing, or would cost memory."""
    flag = "--train.recompute_dropout_masks true"
    if drop_rate == 0:
        raise ConfigError(f"{flag}: --model.drop_rate is 0, so there are no dropout masks; drop the flag")
    if not compiled:
        raise ConfigError(f"{flag} needs torch.compile (--train.compile on): eager autograd would keep each "
                          "dropout's input in place of its mask, which takes more memory, not less")
    if activation_checkpointing:
        raise ConfigError(f"{flag}: --train.activation_checkpointing already recomputes every block, its dropout "
                          "masks included; drop one of the two")


def compiled_autograd(enabled: bool, mode: str) -> AbstractContextManager:
    """`--train.compiled_autograd`, around each micro-step's forward and backward: torch's compiled autograd
    traces the whole backward, the gradient accumulation included, and inductor compiles it (in `mode`, with the
    shapes static, as training's are). So from the second micro-step of an accumulation on, the fp32 gradient of
    each weight is added into `.grad` inside backward's own fused kernels (its 16-bit product converted and added
    in one pass) instead of by an eager add per parameter after it. Two graphs per run: the first micro-step's,
    whose `.grad` is unset, and the others' (three under DDP with 3 or more micro-steps: the middle ones, whose
    gradients are not reduced, compile apart from the last)."""
    if not enabled:
        return contextlib.nullcontext()
    mode_arg = None if mode == "default" else mode

    def compiler(graph: torch.fx.GraphModule) -> Callable:
        return torch.compile(graph, backend="inductor", mode=mode_arg, fullgraph=True, dynamic=False)

    return torch._dynamo.compiled_autograd._enable(compiler, dynamic=False)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the --train.compile_mode values that use CUDA graphs


def check_compiled_autograd(compiled: bool, strategy: str, mode: str) -> None:
    """Refuse `--train.compiled_autograd true` where it cannot run, or has not run."""
    flag = "--train.compiled_autograd true"
    if not compiled:
        raise ConfigError(f"{flag} needs torch.compile (--train.compile on): it compiles the backward of a compiled "
                          "model; this run is eager")
    if mode in CUDA_GRAPH_MODES:
        raise ConfigError(f"{flag} with --train.compile_mode {mode}: CUDA graphs around a compiled backward that "
                          "sets .grad have not been tried here; use compile_mode default or "
                          "max-autotune-no-cudagraphs")
    if strategy == "fsdp":
        raise ConfigError(f"{flag}: FSDP2's backward hooks cannot be traced by compiled autograd (torch "
                          f"{torch.__version__.split('+')[0]}); use it with one process or DDP, or drop the flag")


def compile_wanted(setting: str, device: torch.device) -> bool:
    if setting == "on":
        return True
    if setting == "off":
        return False
    return device.type == "cuda" and sys.platform.startswith("linux")


def compile_model(model: nn.Module, scope: str, mode: str, *, backend: str | Callable = "inductor") -> nn.Module:
    """torch.compile the whole model (`scope="model"`: returns the compiled wrapper, pass DDP's wrapper here)
    or each transformer block in place (`"blocks"`: returns `model` itself, parameter names unchanged).

    `model` may be the GPT, a DDP wrapper of it or an FSDP2 GPT; apply activation checkpointing first.
    `backend` is torch.compile's (tests use cheaper ones than inductor).
    """
    mode_arg = None if mode == "default" else mode
    if scope == "model":
        return torch.compile(model, mode=mode_arg, backend=backend)
    if scope != "blocks":
        raise ConfigError(f"--train.compile_scope: {scope!r} is not a compile scope; use model or blocks")
    gpt = model.module if isinstance(model, DistributedDataParallel) else model
    for block in gpt.blocks:
        eager = block.forward  # the bound method, or activation checkpointing's partial around it
        compiled = torch.compile(eager, mode=mode_arg, backend=backend)
        # An instance attribute, not a wrapper module: state_dict keys keep their names (no `_orig_mod`),
        # and FSDP2's hooks, registered on Module.__call__, still run around it.
        block.forward = functools.partial(_compiled_block_forward, eager, compiled)
    return model


def _compiled_block_forward(eager: Callable, compiled: Callable, x: torch.Tensor, cache=None) -> torch.Tensor:
    # Training only. Decoding with a KVCache stays eager (the compiled graph would guard on cache.pos, a Python
    # int, and recompile at every token), and so does evaluation: a no-grad graph, another for the last batch's
    # size, and FSDP's dummy forwards on ranks out of windows would each compile again, at different times on
    # different ranks.
    if cache is not None or not torch.is_grad_enabled():
        return eager(x, cache)
    return compiled(x)


# --train.attention -> the kernel scaled_dot_product_attention is pinned to (auto: PyTorch picks per call).
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_CUDA_ONLY = ("cudnn", "efficient")  # CPU builds have only the flash (fp16/bf16/fp32, no dropout) and math kernels


def attention_context(name: str, device: torch.device) -> AbstractContextManager[None]:
    """The context to run training forward AND backward (and evaluation) in, pinning `--train.attention`.

    Under torch.compile the kernel is chosen when the graph is traced and changing the context later does not
    recompile: enter it around every call of the compiled model, the first one included. Checkpointed blocks
    recompute attention in backward, so backward needs it too. Not for KV-cache decoding (flash and efficient
    refuse the mask of a several-token step). Call `check_attention` once at setup: this only refuses what
    cannot work on `device` at all, without running anything.
    """
    if name == "auto":
        return contextlib.nullcontext()
    if name not in SDPA_BACKENDS or (name in _CUDA_ONLY and device.type != "cuda"):
        check_attention(name, device)  # raises
    return sdpa_kernel(SDPA_BACKENDS[name])


def check_attention(name: str, device: torch.device, *, dtype: torch.dtype = torch.float32, head_dim: int = 64,
                    dropout: float = 0.0, seq_len: int = 16) -> None:
    """Refuse `--train.attention NAME` where that kernel cannot serve training: it is tried once on a causal
    attention with the run's compute dtype, head size, dropout and sequence length, laid out as the model lays
    it out, forward and backward (the kernels' limits on GPU, dtype, head size and strides vary across GPUs and
    releases: asking the kernel is the sure test)."""
    if name == "auto":
        return
    if name not in SDPA_BACKENDS:
        raise ConfigError(f"--train.attention: {name!r} is not an attention kernel; "
                          f"use auto, {', '.join(SDPA_BACKENDS)}")

    def fails(n: str) -> str | None:
        if n in _CUDA_ONLY and device.type != "cuda":
            return "needs a CUDA GPU"
        return _sdpa_failure(SDPA_BACKENDS[n], device, dtype, head_dim, dropout, seq_len)

    reason = fails(name)
    if reason is None:
        return
    works = ["auto (PyTorch's choice)"] + [n for n in SDPA_BACKENDS if n != name and fails(n) is None]
    use = "use " + (f"{', '.join(works[:-1])} or {works[-1]}" if len(works) > 1 else works[0])
    if name in _CUDA_ONLY and device.type != "cuda":
        raise ConfigError(f"--train.attention: {name} needs a CUDA GPU and this run is on {device.type}; {use}")
    setting = f"{str(dtype).removeprefix('torch.')}, head size {head_dim}, dropout {dropout:g}"
    raise ConfigError(f"--train.attention: {name} cannot run on {device.type} with {setting} ({reason}); {use}")


def _sdpa_failure(backend: SDPBackend, device: torch.device, dtype: torch.dtype, head_dim: int,
                  dropout: float, seq_len: int) -> str | None:
    """None if the kernel runs a causal attention forward and backward, else why not (one line)."""
    # (B, T, 3, heads, head_dim) permuted to three (B, heads, T, head_dim) views: the model's strides.
    qkv = torch.ones(1, seq_len, 3, 2, head_dim, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    # fork_rng: the probe's dropout must not move the run's random stream (same seed, same run with any kernel).
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])  # the CPU state is always kept
    with rng, warnings.catch_warnings(record=True) as caught, torch.enable_grad(), sdpa_kernel(backend):
        warnings.simplefilter("always")  # torch tells why it skipped a kernel only in warnings
        try:
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True).sum().backward()
            return None
        except RuntimeError as e:
            error = str(e).splitlines()[0]
    whys = [str(w.message).split(" (Triggered internally")[0].strip() for w in caught]
    return " ".join(w for w in whys if w and not w.endswith("because:")) or error


def wrap_ddp(model: nn.Module, info: DistInfo, python_reducer: bool = False) -> nn.Module:
    """DDP, gradients as views into its buckets. `python_reducer` for --train.compiled_autograd: DDP's C++ reducer
    cannot run inside a compiled backward; its Python reducer can, its all-reduces traced into that graph. DDP picks
    its reducer from the setting when built; dynamo reads it again at each compile, but only to split graphs for
    the DDP whose forward is running, which a Python-reducer DDP never marks. Release it with `release_ddp`."""
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    mode = "python_reducer" if python_reducer else torch._dynamo.config.optimize_ddp
    with torch._dynamo.config.patch(optimize_ddp=mode):
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def release_ddp(ddp: nn.Module | None) -> None:
    """Undo what keeps a DDP alive once dropped: the Python reducer's hook on every parameter closes over the DDP
    and is held from C++, so without this a DDP built by `wrap_ddp(..., python_reducer=True)` outlives its group."""
    for hook in getattr(ddp, "_accum_grad_hooks", ()):
        hook.remove()


def strategy_for(requested: str, info: DistInfo) -> str:
    """`auto`: DDP with more than one process; FSDP only when asked (it is the answer to memory, not speed)."""
    if not info.distributed:
        return "single"
    return "fsdp" if requested == "fsdp" else "ddp"


def build_local_model(cfg: ModelConfig, device: torch.device, precision: str, fp8: bool = False) -> GPT:
    """The whole model on this process's device, as one process or DDP trains it: bf16 weights for bf16-pure,
    the blocks' linears in fp8 when asked (the caller has run fp8.check_fp8)."""
    return _set_precision(build_model(cfg, device), precision, fp8)


def _set_precision(model: GPT, precision: str, fp8: bool, fsdp_world_size: int = 0) -> GPT:
    """bf16 weights for bf16-pure; the blocks' linears in fp8 (the same parameters, so checkpoints are those
    of the plain model), gathered in fp8 under FSDP over `fsdp_world_size` ranks where their rows divide evenly.
    Works on the meta device too, as FSDP's build needs."""
    if precision == "bf16-pure":
        model.to(torch.bfloat16)
    if fp8:
        from gpttrain.fp8 import convert_to_fp8

        convert_to_fp8(model, fsdp_world_size=fsdp_world_size)
    return model


def build_fsdp_model(cfg: ModelConfig, info: DistInfo, precision: str, activation_checkpointing: bool, *,
                     fp8: bool = False) -> GPT:
    """FSDP2: `fully_shard` on each block, then the root; built on the meta device and initialised shard
    by shard, so no rank ever holds the full fp32 model (only one full parameter at a time). With `fp8`, the
    blocks' fp8 linears gather their weights in fp8 (see fp8.convert_to_fp8): the trainer refreshes their scales
    after each optimizer step, and checkpoints save them as plain tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    compute = AUTOCAST_DTYPES.get(precision)
    # Parameters gathered in the compute dtype, gradients reduced in fp32: fp32 master weights stay sharded.
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    with torch.device("meta"):
        model = _set_precision(GPT(cfg), precision, fp8, info.world_size)  # before fully_shard, which shards fp8's own
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
