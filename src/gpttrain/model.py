"""The GPT model: config in, logits out.

Pre-LayerNorm transformer blocks with a fused QKV projection and causal attention through
`scaled_dot_product_attention`. Knows nothing of distribution, devices or files: wrappers
(DDP, FSDP, compile, checkpointing) are applied from outside in `parallel.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpttrain.config import ModelConfig
from gpttrain.loss import linear_cross_entropy


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_len`.

    `pos` is the number of cached positions; the model writes the new keys/values of a forward
    pass at `pos` and advances it once per forward (after the last layer).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.max_len = max_len or cfg.context_length
        head_dim = cfg.emb_dim // cfg.n_heads
        shape = (cfg.n_layers, batch_size, cfg.n_heads, self.max_len, head_dim)  # (L, B, n_heads, T_max, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_heads, T_new, head_dim) after the cached ones; return all keys/values so far."""
        t_new = k.shape[2]
        end = self.pos + t_new
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        self.layer_idx = layer_idx
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.attn_drop = cfg.drop_rate
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, n_heads, T, head_dim)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_heads, start + T, head_dim)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a cache kept in fp32 under autocast or FSDP's bf16 compute
        dropout_p = self.attn_drop if self.training else 0.0
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:
            # One new token sees every cached position: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # Several new tokens after a cached prefix: query i (absolute start + i) sees keys <= start + i.
            q_pos = torch.arange(start, start + T, device=x.device)[:, None]
            k_pos = torch.arange(start + T, device=x.device)[None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, emb_dim)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.norm2 = nn.LayerNorm(cfg.emb_dim)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """GPT-2 style language model. Build on the meta device and call `init_weights()` after
    `to_empty(device=...)` to initialise without ever materialising a throwaway copy."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.final_norm = nn.LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        # Training loss through loss.linear_cross_entropy (no full logits); set from outside (trainer).
        self.chunked_loss = False
        # The residual stream's dtype (--train.residual_dtype), set from outside; None: as the embeddings make it.
        self.residual_dtype: torch.dtype | None = None
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    def init_rule(self, name: str) -> tuple[str, float]:
        """How parameter `name` is initialised: ("normal", std), ("zeros", 0) or ("ones", 0).

        GPT-2 init: N(0, 0.02) weights and embeddings, zero biases, unit norm scales, and residual
        projections scaled by 1/sqrt(2 x layers). A rule per name lets a sharded model (FSDP)
        initialise each parameter exactly as the plain model does (parallel.py).
        """
        module_name, _, kind = name.rpartition(".")
        if kind == "bias":
            return ("zeros", 0.0)
        if "norm" in module_name.rsplit(".", 1)[-1]:
            return ("ones", 0.0)
        if module_name.endswith(("attn.proj", "mlp.proj")):
            return ("normal", 0.02 / math.sqrt(2 * self.cfg.n_layers))
        return ("normal", 0.02)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter by `init_rule`, in `named_parameters()` order (a tied head once)."""
        for name, p in self.named_parameters():
            fill_(p, *self.init_rule(name))

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, emb_dim) for token ids idx (B, T)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.context_length:
            raise ValueError(f"sequence of {start + T} positions exceeds context_length {self.cfg.context_length}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, emb_dim)
        if self.residual_dtype is not None:
            # Every block adds to x in its dtype: a 16-bit x keeps the 16-bit linears' outputs from promoting it.
            x = x.to(self.residual_dtype)
        for block in self.blocks:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        return self.final_norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, *, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) or, with `targets` (B, T), the mean cross-entropy loss. `last_only`: the logits
        of the last position alone (B, 1, vocab), all that decoding needs (the head's work on the rest skipped)."""
        if last_only and targets is not None:
            raise ValueError("last_only is for decoding: the loss needs every position's logits")
        h = self.hidden(idx, cache)
        if targets is not None and self.chunked_loss:
            return linear_cross_entropy(h, self.out_head.weight, targets)
        if last_only:
            h = h[:, -1:]  # (B, 1, emb_dim)
        logits = self.out_head(h)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def num_params(self) -> int:
        """Parameters counted once (a tied head is not counted twice)."""
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def fill_(t: torch.Tensor, kind: str, std: float) -> torch.Tensor:
    if kind == "zeros":
        return t.zero_()
    if kind == "ones":
        return t.fill_(1.0)
    return t.normal_(mean=0.0, std=std)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", *, init: bool = True) -> GPT:
    """Construct on the meta device, allocate on `device`, initialise: the only random numbers drawn
    are the init's own, so the same seed gives the same weights on any device and rank.

    `init=False` leaves the weights uninitialised, for a caller that loads every one of them next
    (a strict `load_state_dict`): a 774M model's random init costs seconds on a CPU."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.out_head.weight = model.tok_emb.weight  # to_empty allocated the two separately
    if init:
        model.init_weights()
    return model


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from the config alone (no allocation)."""
    d, L, V, T = cfg.emb_dim, cfg.n_layers, cfg.vocab_size, cfg.context_length
    per_block = (
        3 * d * d + (3 * d if cfg.qkv_bias else 0)  # qkv
        + d * d + d  # attention output projection
        + 4 * d * d + 4 * d + 4 * d * d + d  # MLP
        + 4 * d  # two LayerNorms
    )
    head = 0 if cfg.tie_embeddings else V * d
    return V * d + T * d + L * per_block + 2 * d + head
