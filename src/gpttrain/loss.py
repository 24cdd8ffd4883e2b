"""Output head + cross-entropy in row chunks, so the full (tokens x vocab) fp32 logits never exist.

The standard path holds the head's logits, their fp32 copy, the log-softmax saved for backward and
the logits' gradient at once: about 14 bytes x tokens x vocab (5.8 GB for the 1.42B model at micro-
batch 8). Here each chunk of rows computes its logits, its loss and, in the same pass, its
gradients with respect to the hidden states and the head's weight; only those gradients are kept
(tokens x width and vocab x width), and backward scales them by the incoming gradient.
"""

from __future__ import annotations

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run the head's matmul in (the tensor's own dtype without autocast)."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def compiles_head(compiled: bool, compile_scope: str) -> bool:
    """Whether torch.compile takes in the output head and the loss: it compiles the whole model
    (`--train.compile_scope blocks` compiles the blocks alone)."""
    return compiled and compile_scope == "model"


def chunked_loss_wanted(setting: str, device_type: str, precision: str, compiled_head: bool) -> bool:
    """`--train.fused_loss`: `auto` is on for CUDA, where eager autograd keeps the full logits several times over
    (about 14 bytes per logit: GBs), except in a 16-bit run whose head and loss torch.compile compiles (the
    whole model, `--train.compile_scope model`): inductor fuses the plain cross-entropy there, keeping only the
    16-bit logits, which their gradient then overwrites. Measured on an H200 (gpt2-124m, micro-batch 32,
    dropout 0, compiled) the plain loss ran 7% faster and peaked 0.3 GiB lower than this one; on CPU (4096 rows,
    width 256, vocabulary 4096, bf16 autocast) the compiled plain loss peaked at 41.7 MB, the compiled chunks at
    44.2. In fp32 the compiled plain loss keeps fp32 logits (75.5 MB there, the chunks 16.5): chunks stay on."""
    if setting != "auto":
        return setting == "on"
    return device_type == "cuda" and not (compiled_head and precision != "fp32")


def chunk_rows_for(vocab_size: int, budget_bytes: int = 1 << 28) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about `budget_bytes` (256 MiB by default)."""
    return max(1, budget_bytes // (4 * vocab_size))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, compute_dtype: torch.dtype, need_grad: bool):
        # h (N, d), weight (V, d), targets (N,)
        n = h.shape[0]
        hc, wc = h.to(compute_dtype), weight.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=_kept(h.dtype), device=h.device) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            logits = (hc[start:end] @ wc.t()).float()  # (rows, V)
            tgt = targets[start:end]
            lse = torch.logsumexp(logits, dim=-1)
            loss_sum += (lse - logits.gather(1, tgt[:, None]).squeeze(1)).sum()
            if need_grad:
                # d(sum loss)/d(logits) = softmax - onehot, in place over the logits. The 1/N of the mean is
                # applied after the matmuls, in fp32: divided first, entries ~1/N would underflow in fp16.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(end - start, device=h.device), tgt] -= 1.0
                pc = probs.to(compute_dtype)
                grad_h[start:end] = ((pc @ wc).float() / n).to(grad_h.dtype)
                grad_w.add_(pc.t() @ hc[start:end], alpha=1.0 / n)  # in fp32, without (V, d) fp32 temporaries
                del probs, pc
            del logits, lse  # before the next chunk's logits exist: one chunk alive at a time
        if need_grad:
            # Kept in fp32 where they would be fp16 (FSDP's fp16 weights, a 16-bit residual stream under fp16-mixed):
            # fp16-mixed's loss scale arrives only in backward's grad_out, and before it entries this small
            # (divided by N) underflow in fp16, where the standard path's gradients are scaled first.
            ctx.dtypes = (h.dtype, weight.dtype)
            ctx.save_for_backward(grad_h, grad_w.to(_kept(weight.dtype)))
        return loss_sum / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h * grad_out).to(h_dtype), (grad_w * grad_out).to(w_dtype), None, None, None, None


def _kept(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient waits for backward in: fp32 for fp16 (see the forward), else its own."""
    return torch.float32 if dtype == torch.float16 else dtype


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets`, never materialising all the logits.

    h (..., d) and targets (...) are flattened; the matmul runs in autocast's dtype when autocast is on
    (as `nn.Linear` would), the softmax and loss in fp32. Equals `F.cross_entropy(F.linear(h, weight)
    .float(), targets)` and its gradients.
    """
    d = h.shape[-1]
    h2, t2 = h.reshape(-1, d), targets.reshape(-1)
    rows = chunk_rows or chunk_rows_for(weight.shape[0])
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(h2, weight, t2, rows, _compute_dtype(h), need_grad)
