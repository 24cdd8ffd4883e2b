import re

import pytest

from gpttrain.errors import TokenizerError
from gpttrain.tokenizer import EOT_TEXT, BPETokenizer, ByteTokenizer, GPT2Tokenizer, from_spec, payload_of
from tests.helpers import CORPUS, TOKENIZER_KINDS, UNICODE, make_tokenizer


@pytest.fixture
def gpt2(shared_data):
    return GPT2Tokenizer(shared_data("gpt2.tiktoken"))


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256
    assert gpt2.decode([15496, 995, 50256]) == "Hello world" + EOT_TEXT


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_end_of_text_in_text_is_ordinary(shared_data, kind):
    text = "a <|endoftext|> b<|endoftext|>"
    tok = make_tokenizer(kind, shared_data)
    ids = tok.encode(text)
    assert tok.eot_id not in ids
    assert tok.decode(ids) == text
    if hasattr(tok, "encode_batch"):
        assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_gpt2_rebuilt_from_its_payload(gpt2):
    again = from_spec(gpt2.spec(), payload_of(gpt2))
    assert again.encode(UNICODE) == gpt2.encode(UNICODE)


def test_gpt2_unavailable_offline(tmp_path, monkeypatch):
    # An empty tiktoken cache and a proxy that refuses at once: no file, no cache, no network.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(TokenizerError, match="--tokenizer-file"):
        GPT2Tokenizer(None)


def test_gpt2_missing_and_bad_files(tmp_path):
    with pytest.raises(TokenizerError, match=r"--tokenizer-file: '.*nope.tiktoken' does not exist"):
        GPT2Tokenizer(tmp_path / "nope.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not a ranks file at all\n")
    with pytest.raises(TokenizerError, match="not a tiktoken ranks file"):
        GPT2Tokenizer(bad)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_round_trip_every_kind(shared_data, kind):
    tok = make_tokenizer(kind, shared_data)
    ids = tok.encode(UNICODE)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.eot_id not in ids
    assert tok.decode(ids) == UNICODE
    assert tok.decode(ids + [tok.eot_id]) == UNICODE + EOT_TEXT


def test_round_trip_random_unicode():
    import random

    rng = random.Random(0)
    tokens = [ByteTokenizer(), BPETokenizer.train(CORPUS, 300)]
    for _ in range(50):
        text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF),
                                       rng.randrange(0x10000, 0x10FFFF)])) for _ in range(rng.randrange(1, 40)))
        for tok in tokens:
            assert tok.decode(tok.encode(text)) == text


def test_bpe_training_is_deterministic_and_serializable(tmp_path):
    a = BPETokenizer.train(CORPUS, 320)
    b = BPETokenizer.train(CORPUS, 320)
    assert a.to_json() == b.to_json()
    assert a.spec() == b.spec()
    assert a.vocab_size == 320
    path = tmp_path / "tokenizer.json"
    a.save(path)
    c = BPETokenizer.from_file(path)
    assert c.encode(UNICODE) == a.encode(UNICODE)
    d = from_spec(a.spec(), payload_of(a))
    assert d.encode(CORPUS[1]) == a.encode(CORPUS[1])
    assert len(a.encode(CORPUS[1])) < len(CORPUS[1]) / 2  # it learned merges


def test_bpe_bad_file(tmp_path):
    bad = tmp_path / "tok.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a tokenizers JSON file"):
        BPETokenizer.from_file(bad)
    with pytest.raises(TokenizerError, match="does not exist"):
        BPETokenizer.from_file(tmp_path / "absent.json")
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(TokenizerError, match="not a tokenizers JSON file"):
        BPETokenizer.from_file(bad)


def test_bpe_file_without_endoftext_is_named_as_such(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=280, special_tokens=["</s>"], show_progress=False))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))  # a valid tokenizers file, whose documents end in </s>
    with pytest.raises(TokenizerError, match=re.escape(f"--tokenizer-file: {path}: bpe tokenizer has no <|endoftext|> "
                                                       "token; retrain it with gpttrain prepare")):
        BPETokenizer.from_file(path)


def test_bpe_spec_mismatch_is_refused():
    a = BPETokenizer.train(CORPUS, 300)
    b = BPETokenizer.train(CORPUS[:1], 280)
    with pytest.raises(TokenizerError, match="does not match"):
        from_spec(a.spec(), payload_of(b))


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.encode("A") == [65]
    assert tok.vocab_size == 257 and tok.eot_id == 256
    assert from_spec(tok.spec()).encode("hé") == tok.encode("hé")


def test_unknown_kind():
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'sentencepiece'"):
        from_spec({"kind": "sentencepiece"})


def test_spec_differences_ignore_a_hash_one_side_lacks():
    """gpt2 from tiktoken's cache has no ranks file to hash, the same ranks from a file do: the same ids, so a
    resume or an --init-from across the two is not refused; any other difference is."""
    from gpttrain.tokenizer import spec_differences

    cache = {"kind": "gpt2", "name": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    assert spec_differences(cache, dict(cache, sha256="ab")) == []
    assert spec_differences(dict(cache, sha256="ab"), dict(cache, sha256="cd")) == [("sha256", "ab", "cd")]
    bpe = {"kind": "bpe", "vocab_size": 841, "eot_id": 0, "sha256": "ab"}
    assert spec_differences(bpe, dict(bpe, vocab_size=900)) == [("vocab_size", 841, 900)]
