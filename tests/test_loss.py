"""The chunked head + cross-entropy equals the reference loss and its gradients."""

import pytest
import torch
import torch.nn.functional as F

from gpttrain.config import ModelConfig
from gpttrain.loss import chunk_rows_for, linear_cross_entropy
from gpttrain.model import build_model


def reference(h, w, t):
    return F.cross_entropy(F.linear(h, w).float().view(-1, w.shape[0]), t.reshape(-1))


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
def test_loss_and_gradients_equal_the_reference_fp32(chunk_rows):
    torch.manual_seed(0)
    h = torch.randn(3, 21, 32, requires_grad=True)
    w = torch.randn(101, 32, requires_grad=True)
    t = torch.randint(0, 101, (3, 21))
    loss = linear_cross_entropy(h, w, t, chunk_rows)
    ref = reference(h, w, t)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    (2.5 * loss).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (2.5 * ref).backward()
    # Float sums in another order: gradients of order 1e-2 agree to about 1e-7.
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_autocast_reference():
    torch.manual_seed(0)
    h = torch.randn(64, 48, requires_grad=True)
    w = (0.1 * torch.randn(203, 48)).requires_grad_()
    t = torch.randint(0, 203, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, 16)
        ref = reference(h, w, t)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref.backward()
    assert gw.dtype == torch.float32
    torch.testing.assert_close(gh, h.grad, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(gw, w.grad, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_and_grads_with_chunked_loss(tied):
    cfg = ModelConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                      tie_embeddings=tied)
    torch.manual_seed(0)
    model = build_model(cfg)
    idx = torch.randint(0, 97, (4, 16))
    ref = model(idx, idx.roll(-1, 1))
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.chunked_loss = True
    loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, idx), F.cross_entropy(model(idx).view(-1, 97), idx.view(-1)))


def test_chunk_rows():
    assert chunk_rows_for(50304) == (1 << 28) // (4 * 50304)
    assert chunk_rows_for(10**12) == 1


def test_half_precision_gradients_do_not_underflow():
    # Many rows: entries of (softmax - onehot) / N fall below fp16's smallest normal number if the 1/N is
    # applied before the cast. Compare fp16 to fp32 on the rows of the head that no target uses.
    torch.manual_seed(0)
    n, v, d = 4096, 512, 32
    h = torch.randn(n, d, requires_grad=True)
    w = (0.05 * torch.randn(v, d)).requires_grad_()
    t = torch.randint(0, v // 2, (n,))  # the upper half of the vocabulary is never a target
    linear_cross_entropy(h, w, t, 1024).backward()
    want = w.grad.clone()
    w.grad = None

    def run_in(dtype):
        # What autocast would do: the matmuls in `dtype`, the rest in fp32.
        from gpttrain import loss as loss_mod

        orig = loss_mod._compute_dtype
        loss_mod._compute_dtype = lambda _t: dtype
        try:
            linear_cross_entropy(h, w, t, 1024).backward()
        finally:
            loss_mod._compute_dtype = orig
        g = w.grad.clone()
        w.grad = None
        return g

    got = run_in(torch.float16)
    unused = want[v // 2:]
    assert torch.count_nonzero(got[v // 2:]) == got[v // 2:].numel()
    torch.testing.assert_close(got[v // 2:], unused, rtol=2e-2, atol=1e-6)


def test_fp16_inputs_keep_their_gradients_until_the_loss_scale_arrives():
    """fp16-mixed under FSDP gathers fp16 weights, and its 16-bit residual stream gives fp16 hidden states: their
    gradients (divided by N) wait for backward in fp32, as the loss scale that keeps them above fp16's smallest
    numbers comes only with backward's incoming gradient (saved in fp16, 1% of the hidden states' were 0)."""
    torch.manual_seed(0)
    n, d, v = 8192, 32, 1024
    h32, w32, t = torch.randn(n, d), 0.02 * torch.randn(v, d), torch.randint(0, v, (n,))
    ref_h, ref_w = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    F.cross_entropy(F.linear(ref_h, ref_w), t).backward()
    h, w = h32.half().requires_grad_(), w32.half().requires_grad_()
    scale = 65536.0  # GradScaler's first scale
    (linear_cross_entropy(h, w, t, 2048) * scale).backward()
    assert h.grad.dtype == w.grad.dtype == torch.float16
    for got, want in ((h.grad, ref_h.grad), (w.grad, ref_w.grad)):
        got = got.float() / scale
        assert torch.count_nonzero(got) >= 0.9999 * got.numel()
        assert ((got - want).norm() / want.norm()).item() < 1e-3
