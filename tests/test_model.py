import math

import pytest
import torch
import torch.nn.functional as F

from gpttrain.config import PRESETS, ModelConfig, resolve
from gpttrain.model import GPT, KVCache, build_model, count_params

# Parameter counts per preset, computed by hand from the architecture (embeddings, blocks with
# fused qkv, output projection and MLP biases, two norms each, final norm, head unless tied).
EXPECTED_PARAMS = {
    "tiny": 169_344,
    "demo": 4_947_840,
    "gpt2-124m": 124_475_904,  # nanoGPT's count for GPT-2 small with vocab 50304
    "gpt2-355m": 354_871_296,  # HF gpt2-medium (354,823,168) + 47 padded vocab rows x 1024
    "gpt2-774m": 774_090_240,  # HF gpt2-large (774,030,080) + 47 x 1280
    "gpt2-1.5b": 1_557_686_400,  # HF gpt2-xl (1,557,611,200) + 47 x 1600
    "gpt-1.4b": 1_416_597_504,  # the original script's model
}


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_per_preset(name):
    cfg = resolve(name).model
    assert count_params(cfg) == EXPECTED_PARAMS[name]
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == EXPECTED_PARAMS[name]


def test_every_preset_has_an_expected_count():
    assert set(EXPECTED_PARAMS) == set(PRESETS)


def test_output_shapes_and_loss():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 11))
    logits = model(idx)
    assert logits.shape == (3, 11, cfg.vocab_size)
    loss = model(idx, targets=idx)
    assert loss.shape == ()
    assert torch.allclose(loss, F.cross_entropy(logits.view(-1, cfg.vocab_size), idx.view(-1)))
    # Untrained: about log(vocab).
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5
    last = model(idx, last_only=True)  # what decoding asks for: the last position's logits alone
    assert last.shape == (3, 1, cfg.vocab_size)
    torch.testing.assert_close(last, logits[:, -1:])
    with pytest.raises(ValueError, match="last_only is for decoding"):
        model(idx, targets=idx, last_only=True)


def test_too_long_sequence_is_refused():
    cfg = tiny_cfg()
    model = GPT(cfg)
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, cfg.context_length + 1, dtype=torch.long))


def test_causality():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    base = model(idx)
    for t in range(11):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % cfg.vocab_size
        out = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"position {t} saw the future"
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def reference_attention(attn, x):
    """Explicit masked softmax over the same projections."""
    B, T, C = x.shape
    q, k, v = attn.qkv(x).split(C, dim=-1)
    q, k, v = (t.view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return attn.proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_sdpa_equals_masked_softmax_reference(qkv_bias):
    torch.manual_seed(0)
    cfg = tiny_cfg(qkv_bias=qkv_bias)
    model = GPT(cfg).eval()
    x = torch.randn(2, 13, cfg.emb_dim)
    for block in model.blocks:
        got = block.attn(x)
        want = reference_attention(block.attn, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_init_statistics():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=2048, context_length=256, emb_dim=256, n_heads=4, n_layers=8, drop_rate=0.0)
    model = GPT(cfg)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            if "norm" not in name:
                assert torch.count_nonzero(p) == 0, name
            continue
        if "norm" in name:
            assert torch.all(p == 1), name
            continue
        want = resid_std if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else 0.02
        assert abs(p.std().item() - want) / want < 0.05, (name, p.std().item(), want)
        assert abs(p.mean().item()) < 0.01 * want * 10, name


def test_tied_head_shares_the_embedding():
    cfg = tiny_cfg(tie_embeddings=True)
    model = GPT(cfg)
    assert model.out_head.weight is model.tok_emb.weight
    built = build_model(cfg)
    assert built.out_head.weight is built.tok_emb.weight
    unloaded = build_model(cfg, init=False)  # what load, consolidate and resume fill: tied before any weight comes
    assert unloaded.out_head.weight is unloaded.tok_emb.weight
    assert built.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert count_params(cfg) == model.num_params()
    assert count_params(cfg) == count_params(tiny_cfg()) - cfg.vocab_size * cfg.emb_dim


def test_meta_construction_then_init():
    cfg = tiny_cfg()
    with torch.device("meta"):
        model = GPT(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(1)
    model.init_weights()
    torch.manual_seed(1)
    built = build_model(cfg)
    assert all(torch.isfinite(p).all() for p in built.parameters())
    for (n1, p1), (_, p2) in zip(model.named_parameters(), built.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_dropout_only_in_training():
    torch.manual_seed(0)
    cfg = tiny_cfg(drop_rate=0.5)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


def test_dropout_sites():
    """Dropout where GPT-2 has it: on the sum of the token and position embeddings, on each attention and MLP
    output before it joins the residual stream, and on the attention weights (inside SDPA)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(drop_rate=0.5)
    model = GPT(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    fed, made = {}, {}  # dropout module -> its input; projection -> its output
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(lambda mod, args, out, name=name: fed.__setitem__(name, args[0]))
        if name.endswith(("attn.proj", "mlp.proj")):
            m.register_forward_hook(lambda mod, args, out, name=name: made.__setitem__(name, out))
    model(idx)
    blocks = [f"blocks.{i}" for i in range(cfg.n_layers)]
    assert set(fed) == {"drop", *(f"{b}.attn.resid_drop" for b in blocks), *(f"{b}.mlp.drop" for b in blocks)}
    with torch.no_grad():
        torch.testing.assert_close(fed["drop"], model.tok_emb(idx) + model.pos_emb(torch.arange(8)))
    for b in blocks:
        assert fed[f"{b}.attn.resid_drop"] is made[f"{b}.attn.proj"]
        assert fed[f"{b}.mlp.drop"] is made[f"{b}.mlp.proj"]
    # The attention weights' dropout alone (every nn.Dropout off) still makes training passes differ.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    assert not torch.equal(model(idx), model(idx))
    for block in model.blocks:
        block.attn.attn_drop = 0.0
    assert torch.equal(model(idx), model(idx))


def test_kv_cache_prefill_then_decode_equals_full_forward():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    full = model(idx)
    cache = KVCache(cfg, batch_size=2)
    parts = [model(idx[:, :5], cache=cache)]
    parts.append(model(idx[:, 5:9], cache=cache))  # several tokens after a prefix
    for t in range(9, cfg.context_length):
        parts.append(model(idx[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == cfg.context_length
