"""One small interface over three tokenizers: gpt2 (tiktoken), bpe (HF tokenizers), byte.

Every tokenizer has `encode(text) -> list[int]` (ordinary text, no special tokens), `decode(ids)`,
`eot_id`, `vocab_size`, `kind`, and `spec()`: a JSON-serializable dict from which
`from_spec()` rebuilds the same tokenizer (it travels in meta.json and in checkpoints).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from gpttrain.errors import TokenizerError

EOT_TEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def spec(self) -> dict[str, Any]: ...


SPEC_KEYS = ("kind", "vocab_size", "eot_id", "sha256")  # what decides the ids a tokenizer gives


def spec_differences(was: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, was, now) for each way two tokenizer specs give other ids. A sha256 one side lacks is none: gpt2 from
    tiktoken's own cache has no file to hash, the same ranks from a file do (bpe always has one)."""
    return [(k, was.get(k), now.get(k)) for k in SPEC_KEYS if was.get(k) != now.get(k)
            and not (k == "sha256" and (was.get(k) is None or now.get(k) is None))]


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus end-of-text 256."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256
    decodes_bytes = True  # decode(a + b) == decode(a) + decode(b) where decode(a) ends on a whole character

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        parts: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                parts.append(out.decode("utf-8", errors="replace"))
                parts.append(EOT_TEXT)
                out = bytearray()
            elif 0 <= i < 256:
                out.append(i)
        parts.append(out.decode("utf-8", errors="replace"))
        return "".join(parts)

    def spec(self) -> dict[str, Any]:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eot_id": self.eot_id}


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken, built from a ranks file when one is given."""

    kind = "gpt2"
    decodes_bytes = True

    def __init__(self, ranks_file: str | Path | None = None, *, ranks_b64: str | None = None):
        import tiktoken

        if ranks_b64 is not None:
            self._raw = base64.b64decode(ranks_b64)
            ranks = _parse_ranks(self._raw, "checkpoint")
        elif ranks_file is not None:
            p = Path(ranks_file)
            if not p.is_file():
                raise TokenizerError(f"--tokenizer-file: {str(p)!r} does not exist; give the path of a GPT-2 "
                                     f"ranks file such as gpt2.tiktoken")
            self._raw = p.read_bytes()
            ranks = _parse_ranks(self._raw, str(p))
        else:
            self._raw = None
            ranks = None
        if ranks is not None:
            from tiktoken_ext.openai_public import r50k_pat_str

            if len(ranks) != GPT2_EOT_ID:
                raise TokenizerError(f"--tokenizer-file: {ranks_file or 'checkpoint'} holds {len(ranks)} ranks, "
                                     f"GPT-2 has {GPT2_EOT_ID}; is it the gpt2 ranks file?")
            self._enc = tiktoken.Encoding(
                name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                special_tokens={EOT_TEXT: GPT2_EOT_ID},
            )
        else:
            try:
                self._enc = tiktoken.get_encoding("gpt2")
            except Exception as e:  # network errors come in many types
                raise TokenizerError(
                    "gpt2 tokenizer: no --tokenizer-file given, tiktoken's cache does not hold gpt2 and it cannot "
                    f"be downloaded ({type(e).__name__}); pass --tokenizer-file PATH to a gpt2.tiktoken ranks "
                    "file, or use --tokenizer bpe / byte"
                ) from None
        self.vocab_size = self._enc.n_vocab
        self.eot_id = GPT2_EOT_ID

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")

    def spec(self) -> dict[str, Any]:
        s: dict[str, Any] = {"kind": "gpt2", "name": "gpt2", "vocab_size": self.vocab_size, "eot_id": self.eot_id}
        if self._raw is not None:
            s["sha256"] = _sha256_bytes(self._raw)
        return s

    def payload(self) -> str | None:
        """The ranks file as base64, so a checkpoint can rebuild the tokenizer without the file."""
        return base64.b64encode(self._raw).decode("ascii") if self._raw is not None else None


def _parse_ranks(raw: bytes, where: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        for line in raw.splitlines():
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    except ValueError:
        raise TokenizerError(f"--tokenizer-file: {where} is not a tiktoken ranks file "
                             "(lines of 'base64-token rank')") from None
    return ranks


class BPETokenizer:
    """Byte-level BPE trained on the user's corpus with HF `tokenizers`; lossless on any Unicode."""

    kind = "bpe"

    def __init__(self, tok: Any):
        self._tok = tok
        from tokenizers import decoders

        # Ours are byte-level; a --tokenizer-file may bring another decoder (Metaspace, WordPiece...).
        self.decodes_bytes = isinstance(tok.decoder, decoders.ByteLevel)
        self.eot_id = tok.token_to_id(EOT_TEXT)
        if self.eot_id is None:
            raise TokenizerError(f"bpe tokenizer has no {EOT_TEXT} token; retrain it with gpttrain prepare")
        self.vocab_size = tok.get_vocab_size()
        self._json = tok.to_str()

    @classmethod
    def train(cls, texts: Iterator[str] | Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOT_TEXT], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_str(text))
        except Exception as e:
            raise TokenizerError(f"bpe tokenizer: cannot read the saved tokenizer ({e})") from None

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        p = Path(path)
        if not p.is_file():
            raise TokenizerError(f"--tokenizer-file: {str(p)!r} does not exist; give a tokenizer.json "
                                 "written by gpttrain prepare --tokenizer bpe")
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_str(p.read_text(encoding="utf-8"))
        except Exception:  # (tokenizers raises its own Exception type)
            raise TokenizerError(f"--tokenizer-file: {p} is not a tokenizers JSON file") from None
        try:
            return cls(tok)
        except TokenizerError as e:  # a tokenizer, but not one gpttrain can use (no <|endoftext|>)
            raise TokenizerError(f"--tokenizer-file: {p}: {e}") from None

    def encode(self, text: str) -> list[int]:
        if EOT_TEXT in text:
            return self._encode_literal_eot(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_literal_eot(self, text: str) -> list[int]:
        # HF matches added tokens inside text; like tiktoken's encode_ordinary, a literal "<|endoftext|>"
        # in a document is ordinary text: encode it in two halves that the added token cannot match.
        ids: list[int] = []
        head, tail = EOT_TEXT[:2], EOT_TEXT[2:]
        for i, part in enumerate(text.split(EOT_TEXT)):
            if i:
                ids += self._tok.encode(head, add_special_tokens=False).ids
                ids += self._tok.encode(tail, add_special_tokens=False).ids
            if part:
                ids += self._tok.encode(part, add_special_tokens=False).ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if any(EOT_TEXT in t for t in texts):
            return [self.encode(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self._json

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self._json, encoding="utf-8")

    def spec(self) -> dict[str, Any]:
        return {"kind": "bpe", "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "sha256": _sha256_bytes(self._json.encode("utf-8"))}

    def payload(self) -> str:
        return self._json


def from_spec(spec: dict[str, Any], payload: str | None = None, *,
              tokenizer_file: str | Path | None = None) -> Tokenizer:
    """Rebuild a tokenizer from `spec()` plus, for gpt2/bpe, its payload (or a file)."""
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        if payload is not None:
            return GPT2Tokenizer(ranks_b64=payload)
        return GPT2Tokenizer(tokenizer_file)
    if kind == "bpe":
        if payload is not None:
            tok = BPETokenizer.from_json(payload)
        elif tokenizer_file is not None:
            tok = BPETokenizer.from_file(tokenizer_file)
        else:
            raise TokenizerError("bpe tokenizer: the saved tokenizer is missing; prepare the data again")
        if "sha256" in spec and tok.spec()["sha256"] != spec["sha256"]:
            raise TokenizerError("bpe tokenizer: the tokenizer file does not match the one the data was prepared with")
        return tok
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected gpt2, bpe or byte")


def payload_of(tok: Tokenizer) -> str | None:
    """What `from_spec` needs besides the spec (None for byte)."""
    fn = getattr(tok, "payload", None)
    return fn() if fn is not None else None

