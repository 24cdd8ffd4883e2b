"""Text generation: temperature, top-k and top-p sampling with the KV cache, and streaming.

The sliding window
------------------
Let ``C`` be the model's ``context_length`` and ``tokens`` the prompt followed by what has been
generated so far (``cur = len(tokens)``). The logits for the next token are always those of the
model run on ``tokens[window_start:cur]``, positions counted from 0 at ``window_start``:

* at the start, ``window_start = max(0, len(prompt) - C)`` (a longer prompt keeps its last ``C``
  tokens, and a warning is logged once);
* before each step, if ``cur - window_start > C`` the window slides:
  ``window_start = cur - (C - shift)`` with ``shift = window_shift(C) = max(1, C // 4)``
  (``C - shift`` is at least 1).

With the cache, the window is prefilled once and then grows by one cached token per step; when
it slides, the cache is emptied and prefilled again with the ``C - shift`` most recent tokens.
Sliding by a quarter of the window rather than by one token means one re-prefill every
``shift`` tokens instead of every token, at the price of a shorter context right after a slide.
``use_cache=False`` recomputes the same windows from scratch every step (the reference).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from gpttrain.errors import ConfigError, shown
from gpttrain.fp8 import has_fp8_layers
from gpttrain.model import KVCache

log = logging.getLogger("gpttrain")

_warned_long_prompt = False


def window_shift(context_length: int) -> int:
    """How many positions the window moves when it slides (see the module docstring)."""
    return max(1, context_length // 4) if context_length > 1 else 0  # keeps C - shift >= 1


def next_window_start(window_start: int, cur: int, context_length: int) -> int:
    """The window start for computing the logits of the token at position `cur` (pure; the rule above)."""
    if cur - window_start > context_length:
        return cur - (context_length - window_shift(context_length))
    return window_start


def check_sampling_args(
    *,
    max_new_tokens: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    seed: int | None = None,
    flags: bool = False,
) -> None:
    """Refuse impossible sampling settings with one message naming the argument: its keyword (`top_p=`) for
    Python callers, its command-line flag (`--top-p`) with `flags` (the `generate` command)."""
    from gpttrain.config import check_seed, check_temperature

    def name(arg: str) -> str:  # the message's start, before the value
        return "--" + arg.replace("_", "-") + ": " if flags else arg + "="

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def number(value) -> bool:  # (math.isnan would overflow on a huge int)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

    if not integer(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"{name('max_new_tokens')}{shown(max_new_tokens)} must be an integer of at least 1")
    if not number(temperature) or temperature < 0:
        raise ConfigError(f"{name('temperature')}{shown(temperature)} must be a number >= 0 (0 = greedy, 1 = the "
                          "model's distribution)")
    check_temperature(name("temperature"), temperature)
    if top_k is not None and (not integer(top_k) or top_k < 1):
        raise ConfigError(f"{name('top_k')}{shown(top_k)} must be an integer of at least 1 (leave it out to keep every "
                          "token)")
    if top_p is not None and (not number(top_p) or not 0.0 < top_p <= 1.0):
        raise ConfigError(f"{name('top_p')}{shown(top_p)} must be a number in (0, 1] (1 keeps every token)")
    if not integer(num_samples) or num_samples < 1:
        raise ConfigError(f"{name('num_samples')}{shown(num_samples)} must be an integer of at least 1")
    if seed is not None:
        check_seed(name("seed"), seed)


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits (B, V) with the tokens outside top-k and outside the nucleus set to -inf.

    The nucleus is the smallest set of most probable tokens whose cumulative probability is >= top_p;
    the most probable token is always kept. top-k is applied first, top-p to what remains. Tokens tied with the
    k-th largest logit are all kept (as Hugging Face's and nanoGPT's top-k do): which of them `torch.topk` would
    pick is unspecified, and `temperature=0` is the way to greedy decoding.
    """
    vocab = logits.size(-1)
    if top_k is not None and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy argmax when temperature is 0, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def _last_logits(model: nn.Module, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits (B, V) of the last position only: the vocabulary projection of the rest is never needed. Through
    forward(), so that an FSDP module gathers its parameters as it does there; a torch.compile'd model decodes
    eagerly (its graph would guard on the cache's position and recompile at every token)."""
    return getattr(model, "_orig_mod", model)(idx, cache=cache, last_only=True)[:, -1]


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and the dtype keys/values come out in: the parameters', or autocast's when it is on."""
    p = next(model.parameters())
    dtype = p.dtype
    if p.dtype == torch.float32 and torch.is_autocast_enabled(p.device.type):
        dtype = torch.get_autocast_dtype(p.device.type)
    return p.device, dtype


def _prompt_tensor(prompt_ids: Sequence[int] | torch.Tensor, eot_id: int | None, vocab_size: int,
                   device: torch.device) -> torch.Tensor:
    if isinstance(prompt_ids, torch.Tensor):
        idx = prompt_ids.to(device=device, dtype=torch.long)
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)  # (1, T)
        if idx.dim() != 2:
            raise ConfigError(f"prompt_ids: must be a list of ints or a (B, T) tensor, got shape "
                              f"{tuple(prompt_ids.shape)}")
    else:
        idx = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device).reshape(1, -1)  # (1, T)
    if idx.size(0) < 1:
        raise ConfigError("prompt_ids: a batch of prompts needs at least one row")
    if idx.size(1) == 0:
        if eot_id is None:
            raise ConfigError("prompt_ids: the prompt is empty and no eot_id was given to start from")
        idx = torch.full((idx.size(0), 1), eot_id, dtype=torch.long, device=device)  # (B, 1)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ConfigError(f"the prompt's token id {bad} is outside the model's vocabulary (0..{vocab_size - 1}); "
                          "was the prompt encoded with the tokenizer the model was trained with?")
    return idx


def generate_ids(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eot_id: int | None = None,
    use_cache: bool = True,
    on_token: Callable[[int, int], None] | None = None,
    vocab_limit: int | None = None,
    logits_hook: Callable[[int, int, torch.Tensor], None] | None = None,
    forced_tokens: torch.Tensor | None = None,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` tokens after `prompt_ids` (a list of ids or a (B, T) tensor).

    Returns the new tokens of each sample, without the prompt and without the end-of-text token
    that stopped it (a sample stops at `eot_id`; the batch stops when all have). An empty prompt
    starts from `eot_id`. `on_token(sample_index, token_id)` is called for every new token as it
    comes. `vocab_limit` keeps sampling below that id (a model's vocabulary padded past the
    tokenizer's). `seed` makes sampling reproducible; without it the global RNG is left untouched.
    The model runs in eval mode under inference_mode (no_grad with fp8 layers); its training mode is
    restored afterwards. `model` is a GPT (possibly under FSDP or torch.compile, which decodes eagerly), or a
    module with its `cfg` whose forward takes `cache=` and `last_only=` as GPT's does.

    For tests and tools: `logits_hook(step, window_start, logits)` sees the logits (B, V) each step
    uses, and `forced_tokens` (B, max_new_tokens) replaces sampling by the given tokens (teacher
    forcing), so cached and recomputed logits can be compared along the same sequence.
    """
    global _warned_long_prompt
    check_sampling_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed)
    cfg = model.cfg
    ctx = cfg.context_length
    device, dtype = _model_device_dtype(model)
    idx = _prompt_tensor(prompt_ids, eot_id, cfg.vocab_size, device)
    batch, prompt_len = idx.shape
    if prompt_len > ctx and not _warned_long_prompt:
        log.warning("prompt of %d tokens is longer than the context window (%d); keeping its last %d tokens",
                    prompt_len, ctx, ctx)
        _warned_long_prompt = True
    generator = None
    if temperature > 0 and forced_tokens is None:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # fresh entropy without touching the global RNG (training resumes stay exact)
        else:
            generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        # torchao's fp8 linears (--train.fp8) cannot run on inference tensors: no_grad for those models.
        with torch.no_grad() if has_fp8_layers(model) else torch.inference_mode():
            # (B, P + room), grown as it fills: a huge max_new_tokens is a budget, not an allocation up front.
            seq = torch.empty(batch, prompt_len + min(max_new_tokens, 4 * ctx), dtype=torch.long, device=device)
            seq[:, :prompt_len] = idx
            cur = prompt_len
            window_start = max(0, prompt_len - ctx)
            cache = KVCache(cfg, batch, ctx, device=device, dtype=dtype) if use_cache else None
            prefill = True
            done = torch.zeros(batch, dtype=torch.bool, device=device)
            done_list = [False] * batch
            for step in range(max_new_tokens):
                new_start = next_window_start(window_start, cur, ctx)
                if new_start != window_start:
                    window_start, prefill = new_start, True
                if cache is None:
                    logits = _last_logits(model, seq[:, window_start:cur], None)
                elif prefill:
                    cache.reset()
                    logits = _last_logits(model, seq[:, window_start:cur], cache)
                    prefill = False
                else:
                    logits = _last_logits(model, seq[:, cur - 1:cur], cache)
                if vocab_limit is not None and vocab_limit < logits.size(-1):
                    logits[:, vocab_limit:] = float("-inf")  # padded rows no tokenizer can decode
                if logits_hook is not None:
                    logits_hook(step, window_start, logits)
                if forced_tokens is not None:
                    nxt = forced_tokens[:, step].to(device)
                else:
                    nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                      generator=generator)
                if eot_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eot_id), nxt)
                if cur == seq.size(1):
                    room = min(seq.size(1), prompt_len + max_new_tokens - cur)
                    seq = torch.cat([seq, seq.new_empty(batch, room)], dim=1)
                seq[:, cur] = nxt
                cur += 1
                if eot_id is not None:
                    done |= nxt == eot_id  # on the device: the next step's torch.where needs it there
                if on_token is not None:
                    toks = nxt.tolist()  # the one host read of a streamed step; `done` follows from it
                    for i, t in enumerate(toks):
                        if not done_list[i] and t != eot_id:
                            on_token(i, t)
                    done_list = [d or t == eot_id for d, t in zip(done_list, toks)]
                    if eot_id is not None and all(done_list):
                        break
                elif eot_id is not None and bool(done.all()):
                    break
            out = seq[:, prompt_len:cur].tolist()
    finally:
        model.train(was_training)
    if eot_id is not None:
        out = [row[:row.index(eot_id)] if eot_id in row else row for row in out]
    return out


class _StreamDecoder:
    """Turns one sample's token ids into text pieces without splitting a multi-byte character.

    The ids are decoded and the new suffix is emitted, holding back trailing U+FFFD (an incomplete
    UTF-8 sequence that the next token may complete). A tokenizer that decodes bytes (`decodes_bytes`:
    byte, gpt2, our byte-level bpe) splits its text cleanly wherever it ends on a whole character, so
    the ids after that point decode on their own and a token costs a short decode. Any other
    tokenizer (a Metaspace decoder drops a word's leading space at the start of a decode) decodes the
    whole list each time.
    """

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.emit = emit
        self.restart = bool(getattr(tokenizer, "decodes_bytes", False))
        self.ids: list[int] = []  # since the last clean boundary (all of them without `restart`)
        self.sent = 0  # characters of their text already emitted

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        whole = text.rstrip("\ufffd")
        self._send(whole)
        if self.restart and len(whole) == len(text):
            self.ids, self.sent = [], 0

    def finish(self) -> None:
        self._send(self.tokenizer.decode(self.ids))

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    stop_at_eot: bool = True,
    use_cache: bool = True,
    stream: Callable[[str], None] | None = None,
) -> list[str]:
    """Generate `num_samples` continuations of `prompt`; returns the new text of each (prompt excluded).

    An empty prompt (one that encodes to no tokens) starts from the end-of-text token, as a fresh
    document would. `stream(piece)` receives the text of sample 0 as it is generated; the pieces
    join to the returned first string.
    """
    check_sampling_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        num_samples=num_samples, seed=seed)
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eot_id]
    device, _ = _model_device_dtype(model)
    idx = torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0).expand(num_samples, -1)  # (S, T)
    decoder = _StreamDecoder(tokenizer, stream) if stream is not None else None

    def on_token(i: int, t: int) -> None:
        if i == 0:
            decoder.push(t)

    rows = generate_ids(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        eot_id=tokenizer.eot_id if stop_at_eot else None, use_cache=use_cache,
        on_token=on_token if decoder is not None else None,
        vocab_limit=min(tokenizer.vocab_size, model.cfg.vocab_size),
    )
    if decoder is not None:
        decoder.finish()
    return [tokenizer.decode(row) for row in rows]
