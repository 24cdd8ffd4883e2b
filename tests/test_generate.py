import importlib
import logging

import pytest
import torch
from torch import nn

from gpttrain.config import ModelConfig
from gpttrain.errors import ConfigError
from gpttrain.model import GPT
from gpttrain.sampling import filter_logits, generate_ids, generate_text, sample_next
from gpttrain.tokenizer import ByteTokenizer
from tests.helpers import TOKENIZER_KINDS

# The sampling module by path (`gpttrain.generate` is the high-level API function).
gen = importlib.import_module("gpttrain.sampling")


def tiny_model(seed: int = 0, **kw) -> GPT:
    base = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    base.update(kw)
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**base))
    with torch.no_grad():  # larger weights than the init: sharper, more varied logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def reference_window_starts(prompt_len: int, steps: int, ctx: int) -> list[int]:
    """The documented rule, written out independently: slide by max(1, ctx // 4) when the window overflows."""
    shift = max(1, ctx // 4) if ctx > 1 else 0
    ws = max(0, prompt_len - ctx)
    out = []
    for cur in range(prompt_len, prompt_len + steps):
        if cur - ws > ctx:
            ws = cur - (ctx - shift)
        out.append(ws)
    return out


# ---- KV cache vs full recomputation ---------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [1, 5, 16, 23])
def test_cached_logits_equal_full_recompute_past_the_window(prompt_len):
    model = tiny_model()
    ctx, steps, batch = model.cfg.context_length, 45, 2  # 45 new tokens: the 16-token window slides often
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, 97, (batch, prompt_len), generator=g)
    forced = torch.randint(0, 97, (batch, steps), generator=g)
    seen = {True: [], False: []}
    for use_cache in (True, False):
        gen.generate_ids(model, prompt, steps, use_cache=use_cache, forced_tokens=forced,
                      logits_hook=lambda step, ws, logits, uc=use_cache: seen[uc].append((ws, logits.clone())))

    starts = reference_window_starts(prompt_len, steps, ctx)
    assert len(set(starts)) > 3  # the window really slid
    seq = torch.cat([prompt, forced], dim=1)
    with torch.no_grad():
        for step, ws in enumerate(starts):
            cur = prompt_len + step
            ref = model(seq[:, ws:cur])[:, -1]
            assert cur - ws <= ctx
            for use_cache in (True, False):
                got_ws, got = seen[use_cache][step]
                assert got_ws == ws
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_long_generation_keeps_every_token_as_its_buffer_grows():
    """The token buffer starts at 4 contexts and grows as it fills: 150 forced tokens at context 16 come back
    whole, and a budget of 1e11 tokens allocates nothing up front (before: 800 GB asked at once, and a crash)."""
    model = tiny_model()
    forced = torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(0))
    assert gen.generate_ids(model, torch.tensor([[1, 2], [3, 4]]), 150, forced_tokens=forced) == forced.tolist()
    first = gen.generate_ids(model, [1, 2, 3], 1, temperature=0.0)[0][0]
    assert gen.generate_ids(model, [1, 2, 3], 10**11, temperature=0.0, eot_id=first) == [[]]


def test_window_rule_helpers():
    assert gen.window_shift(128) == 32
    assert gen.window_shift(2) == 1
    assert gen.window_shift(1) == 0
    assert gen.next_window_start(0, 128, 128) == 0
    assert gen.next_window_start(0, 129, 128) == 129 - 96
    assert gen.next_window_start(5, 10, 1) == 9


def test_greedy_equals_a_plain_argmax_loop_without_cache():
    model = tiny_model(seed=1)
    ctx, steps = model.cfg.context_length, 40
    prompt = [3, 14, 15, 92, 65]
    got = generate_ids(model, prompt, steps, temperature=0.0)[0]

    tokens = list(prompt)
    with torch.no_grad():
        for ws in reference_window_starts(len(prompt), steps, ctx):
            window = torch.tensor([tokens[ws:]])
            tokens.append(int(model(window)[:, -1].argmax()))
    assert got == tokens[len(prompt):]
    assert generate_ids(model, prompt, steps, temperature=0.0, use_cache=False)[0] == got


def test_a_compiled_model_decodes_eagerly():
    """torch.compile'd, the same tokens without a compile: a graph would guard on the cache's position and
    recompile at every token."""
    model = tiny_model(seed=1)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    prompt = [3, 14, 15, 92, 65]
    want = generate_ids(model, prompt, 12, temperature=0.0)
    assert generate_ids(compiled, prompt, 12, temperature=0.0) == want
    assert generate_ids(compiled, prompt, 12, temperature=0.0, use_cache=False) == want
    assert compiles == []
    torch._dynamo.reset()


# ---- sampling -------------------------------------------------------------------------------------


def test_same_seed_same_tokens_and_global_rng_untouched():
    model = tiny_model()
    kw = dict(temperature=0.8, top_k=40, top_p=0.95)
    state = torch.get_rng_state()
    a = generate_ids(model, [1, 2, 3], 30, seed=7, **kw)
    b = generate_ids(model, [1, 2, 3], 30, seed=7, **kw)
    c = generate_ids(model, [1, 2, 3], 30, seed=8, **kw)
    d = generate_ids(model, [1, 2, 3], 30, **kw)  # no seed: fresh entropy, still not the global RNG
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b
    assert a != c
    assert len(d[0]) == 30


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = tiny_model(seed=2)
    greedy = generate_ids(model, [5, 6], 25, temperature=0.0)
    assert generate_ids(model, [5, 6], 25, temperature=0.8, top_k=1, seed=3) == greedy
    assert generate_ids(model, [5, 6], 25, temperature=0.8, top_p=1e-6, seed=3) == greedy
    assert generate_ids(model, [5, 6], 25, temperature=1.5, top_k=1, top_p=0.5, seed=4) == greedy


def _kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    assert _kept(filter_logits(logits, top_p=0.3)) == {1}
    assert _kept(filter_logits(logits, top_p=0.75)) == {1, 3}
    assert _kept(filter_logits(logits, top_p=0.85)) == {1, 3, 2}
    assert _kept(filter_logits(logits, top_p=0.97)) == {0, 1, 2, 3}
    assert _kept(filter_logits(logits, top_p=1.0)) == {0, 1, 2, 3}
    assert _kept(filter_logits(logits, top_p=1e-9)) == {1}  # always at least the most probable
    # Exactly at p (powers of two: the sums are exact): the set that reaches it, not one token more.
    exact = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    assert _kept(filter_logits(exact, top_p=0.75)) == {0, 1}
    assert _kept(filter_logits(exact, top_p=0.5)) == {0}
    assert _kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert _kept(filter_logits(logits, top_k=10)) == {0, 1, 2, 3}
    # top-k first, then top-p on the renormalised rest: 0.5/0.95, 0.3/0.95, 0.15/0.95.
    assert _kept(filter_logits(logits, top_k=3, top_p=0.8)) == {1, 3}
    assert _kept(filter_logits(logits, top_k=3, top_p=0.9)) == {1, 2, 3}
    # Rows are filtered independently.
    two = torch.stack([logits[0], logits[0].flip(0)])
    out = filter_logits(two, top_p=0.75)
    assert _kept(out[:1]) == {1, 3} and _kept(out[1:]) == {0, 2}


def test_sample_next_draws_only_from_the_kept_set():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).expand(2000, -1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(probs.log(), temperature=1.0, top_p=0.75, generator=g)
    assert set(draws.tolist()) == {1, 3}
    frac1 = (draws == 1).float().mean().item()
    assert abs(frac1 - 0.5 / 0.8) < 0.05
    assert sample_next(probs.log(), temperature=0.0).tolist() == [1] * 2000
    # Temperature 2 on [0.8, 0.2]: p0 = 0.8^0.5 / (0.8^0.5 + 0.2^0.5) = 2/3 (applied twice it would be 0.58).
    two = torch.tensor([[0.8, 0.2]]).log().expand(20_000, -1)
    draws = sample_next(two, temperature=2.0, generator=torch.Generator().manual_seed(1))
    assert abs((draws == 0).float().mean().item() - 2 / 3) < 0.015


# ---- stopping, streaming, modes --------------------------------------------------------------------


def test_stops_at_eot_per_sample():
    model = tiny_model(seed=3)
    prompt = torch.tensor([[1, 2, 3], [40, 50, 60]])
    free = generate_ids(model, prompt, 30, temperature=0.0)
    eot = free[0][4]
    got = generate_ids(model, prompt, 30, temperature=0.0, eot_id=eot)

    def cut(row):
        return row[:row.index(eot)] if eot in row else row

    assert got == [cut(free[0]), cut(free[1])]
    assert len(got[0]) <= 4

    streamed = {0: [], 1: []}
    again = generate_ids(model, prompt, 30, temperature=0.0, eot_id=eot,
                         on_token=lambda i, t: streamed[i].append(t))
    assert again == got
    assert [streamed[0], streamed[1]] == got


def test_batch_stops_early_when_every_sample_is_done():
    model = tiny_model(seed=3)
    first = generate_ids(model, [1, 2, 3], 1, temperature=0.0)[0][0]
    calls = []
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    got = generate_ids(model, [1, 2, 3], 50, temperature=0.0, eot_id=first,
                       on_token=lambda i, t: calls.append(t))
    assert got == [[]] and calls == [] and len(forwards) == 1
    # Without a stream too: one forward pass, not 50 (the finished batch stops, it does not run to max tokens).
    forwards.clear()
    assert generate_ids(model, [1, 2, 3], 50, temperature=0.0, eot_id=first) == [[]]
    assert len(forwards) == 1


class ScriptedModel(nn.Module):
    """Emits a fixed token sequence after the prompt, through the cache and the sliding window alike."""

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int = 257, ctx: int = 256):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab_size, context_length=ctx, emb_dim=8, n_heads=1, n_layers=1)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.script = script
        self.prompt_len = prompt_len

    def forward(self, idx, cache=None, last_only=False):
        start = 0
        if cache is not None:
            start = cache.pos
            cache.pos += idx.shape[1]
        produced = start + idx.shape[1] - self.prompt_len  # tokens generated so far (window never slides here)
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.cfg.vocab_size)
        logits[:, -1, self.script[produced]] = 10.0
        return logits[:, -1:] if last_only else logits


def test_stream_pieces_join_to_the_text_and_keep_multibyte_characters_whole():
    tok = ByteTokenizer()
    target = "héllo → 世界 🎉!"
    script = list(target.encode("utf-8")) + [tok.eot_id] + [65] * 50
    prompt = "Say: "
    model = ScriptedModel(script, len(tok.encode(prompt)))
    pieces = []
    out = generate_text(model, tok, prompt, 60, temperature=0.0, stream=pieces.append)
    assert out == [target]
    assert "".join(pieces) == target
    assert all("\ufffd" not in p for p in pieces)
    assert "🎉" in pieces  # its four bytes came out as one piece
    assert len(pieces) == len(target)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_stream_joins_to_the_text_for_every_tokenizer(shared_data, kind):
    """Byte, gpt2 and bpe ids of mixed scripts and emoji: the pieces (decoded since the last whole character,
    not from the start) join to the decode of all ids, and no piece holds a half character."""
    from tests.helpers import UNICODE, make_tokenizer

    text = UNICODE * 3
    tok = make_tokenizer(kind, shared_data)
    assert tok.decodes_bytes
    script = tok.encode(text) + [tok.eot_id]
    prompt_len = len(tok.encode("> "))
    model = ScriptedModel(script, prompt_len, vocab_size=tok.vocab_size, ctx=len(script) + prompt_len + 1)
    pieces, decoded = [], []
    real_decode = tok.decode

    def counting_decode(ids):
        ids = list(ids)
        decoded.append(len(ids))
        return real_decode(ids)

    tok.decode = counting_decode
    out = generate_text(model, tok, "> ", len(script), temperature=0.0, stream=pieces.append)
    assert out == [text] and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # A streamed token decodes the few ids since the last whole character, not the whole list.
    assert max(decoded[:-1]) <= 4


def test_stream_of_a_tokenizer_that_does_not_decode_bytes_keeps_its_spaces():
    """A --tokenizer-file bpe with a Metaspace decoder drops a word's leading space at the start of a decode:
    its stream decodes the whole list each time, and the pieces still join to the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gpttrain.tokenizer import EOT_TEXT, BPETokenizer

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator(["hello world this is a test"] * 20,
                           trainers.BpeTrainer(vocab_size=60, special_tokens=[EOT_TEXT], show_progress=False))
    tok = BPETokenizer(hf)
    assert not tok.decodes_bytes
    text = "hello world this is a test"
    script = tok.encode(text) + [tok.eot_id]
    model = ScriptedModel(script, len(tok.encode("go")), vocab_size=tok.vocab_size)
    pieces = []
    out = generate_text(model, tok, "go", len(script), temperature=0.0, stream=pieces.append)
    assert "".join(pieces) == out[0] and out[0].strip() == text


def test_stream_matches_returned_text_on_random_bytes():
    model = tiny_model(vocab_size=257, context_length=32)
    tok = ByteTokenizer()
    pieces = []
    out = generate_text(model, tok, "Every effort moves you", 80, temperature=1.0, seed=5,
                        num_samples=3, stream=pieces.append)
    assert len(out) == 3
    assert "".join(pieces) == out[0]


def test_training_mode_is_restored():
    model = tiny_model()
    model.train()
    generate_ids(model, [1, 2], 3, temperature=0.0)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    generate_ids(model, [1, 2], 3, temperature=0.0)
    assert not model.training


def test_bf16_model_generates():
    model = tiny_model().to(torch.bfloat16)
    out = generate_ids(model, [1, 2, 3], 40, temperature=0.7, top_k=20, seed=0)
    assert len(out[0]) == 40 and all(0 <= t < 97 for t in out[0])
    assert len(generate_ids(model, [1, 2, 3], 20, temperature=0.0, use_cache=False)[0]) == 20


def test_long_prompt_keeps_its_tail_and_warns(caplog, monkeypatch):
    monkeypatch.setattr(gen, "_warned_long_prompt", False)
    model = tiny_model()
    ctx = model.cfg.context_length
    long_prompt = list(range(1, 41))
    with caplog.at_level(logging.WARNING, logger="gpttrain"):
        a = generate_ids(model, long_prompt, 10, temperature=0.0)
        generate_ids(model, long_prompt, 2, temperature=0.0)
    assert sum("longer than the context window" in r.message for r in caplog.records) == 1
    assert a == generate_ids(model, long_prompt[-ctx:], 10, temperature=0.0)


def test_vocab_limit_and_empty_prompt():
    model = tiny_model(vocab_size=300)
    out = generate_ids(model, [1], 60, temperature=1.0, seed=0, vocab_limit=10)
    assert all(t < 10 for t in out[0])
    assert generate_ids(model, [], 5, temperature=0.0, eot_id=256) == \
        generate_ids(model, [256], 5, temperature=0.0, eot_id=256)
    text = generate_text(model, ByteTokenizer(), "", 5, temperature=0.0, stop_at_eot=False)
    assert len(text) == 1 and isinstance(text[0], str)


@pytest.mark.parametrize("kwargs, keyword", [
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_p=float("nan")), "top_p=nan"),
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(temperature=1e300), "temperature=1e+300"),  # -inf / inf: NaN probabilities
    (dict(temperature=1e-300), "temperature=1e-300"),  # logits / 1e-300 overflow
    (dict(temperature="0.7"), "temperature='0.7'"),
    (dict(seed=2**70), "seed=1180591620717411303424"),
    (dict(seed=-1), "seed=-1"),
    (dict(seed="1"), "seed='1'"),  # not a TypeError from deep inside torch.Generator
    (dict(seed=1.5), "seed=1.5"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=2.0), "max_new_tokens=2.0"),
    (dict(top_k=0), "top_k=0"),
    (dict(top_k=True), "top_k=True"),
    (dict(num_samples=0), "num_samples=0"),
])
def test_bad_sampling_settings_name_the_keyword(kwargs, keyword):
    """From Python the message names the argument as it was passed (the generate command names its flags:
    tests/test_api.py), one ConfigError for a wrong type as for a wrong value."""
    model = tiny_model(vocab_size=257)
    args = dict(max_new_tokens=5)
    args.update(kwargs)
    with pytest.raises(ConfigError) as e:
        generate_text(model, ByteTokenizer(), "hi", **args)
    assert str(e.value).startswith(keyword + " ") and "--" not in str(e.value)
    if "num_samples" not in kwargs:
        with pytest.raises(ConfigError) as e:
            generate_ids(model, [1, 2], **args)
        assert str(e.value).startswith(keyword + " ")


def test_bad_prompts():
    model = tiny_model()
    with pytest.raises(ConfigError, match="prompt_ids: the prompt is empty and no eot_id"):
        generate_ids(model, [], 3)
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        generate_ids(model, [1, 97], 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cache_matches_recompute(dtype):
    model = tiny_model().to("cuda", dtype)
    prompt = torch.randint(0, 97, (2, 5), device="cuda")
    forced = torch.randint(0, 97, (2, 40), device="cuda")
    seen = {True: [], False: []}
    for use_cache in (True, False):
        gen.generate_ids(model, prompt, 40, use_cache=use_cache, forced_tokens=forced,
                      logits_hook=lambda step, ws, logits, uc=use_cache: seen[uc].append(logits.float().cpu()))
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    for a, b in zip(seen[True], seen[False]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    out = generate_ids(model, prompt, 30, temperature=0.8, top_k=20, top_p=0.9, seed=0, eot_id=3)
    assert len(out) == 2
