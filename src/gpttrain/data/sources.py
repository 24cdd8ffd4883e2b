"""Inputs -> documents -> text pieces: what `prepare` reads, and which split each piece goes to.

Inputs are files, directories, globs and .jsonl files (none = the Python standard library's own sources);
a document is a text file or a JSONL line; pieces are cut where tokenization cannot change.

Split rule: with many documents (10 / min(f, 1 - f) or more: about 10 in the smaller split) a document
goes to val when a hash of its key (its path relative to the input directory, or its file name; plus
":line" for a JSONL line) falls below `val_fraction`: deterministic, blind to size and order, and stable
when files are added. With fewer documents each one is cut by characters: its first
floor((1 - f) * chars) characters go to train, the rest to val, as the original script did with its
single text. Every document side ends with one end-of-text token.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpttrain.errors import DataError

__all__ = ["default_corpus_files", "resolve_inputs", "split_mode"]

READ_CHARS = 1 << 20  # characters read from a file at a time
MAX_PIECE_CHARS = 1 << 24  # a text with no safe cut point for this long is cut at a newline anyway
TRAIN, VAL = 0, 1
# encodings/ is mostly codec tables (12% of the bytes), neither code nor prose a model should imitate.
_EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}


# ----------------------------------------------------------------------------------------------- sources


def default_corpus_files() -> list[Path]:
    """The embedded default corpus: the standard library's own .py files, without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS and not d.startswith(".")]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    if not files:
        raise DataError(f"the default corpus (the Python standard library's .py files under {root}) is not "
                        "there; give INPUT files to prepare")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    exts = []
    for e in extensions:
        e = e.strip().lower()
        if e:
            exts.append(e if e.startswith(".") else "." + e)
    return tuple(exts)


def _scan_dir(root: Path, exts: tuple[str, ...]) -> list[tuple[Path, str]]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, .venv, our own temp dirs
        found.extend(Path(dirpath, f) for f in filenames
                     if not f.startswith(".") and f.lower().endswith(exts))
    if not found:
        raise DataError(f"input directory {root} holds no files ending in {', '.join(exts) or '(none)'}; "
                        "name the extensions with --ext")
    keyed = [(p, p.relative_to(root).as_posix()) for p in found]
    return sorted(keyed, key=lambda pk: pk[1])


def resolve_inputs(inputs: Sequence[str | Path], extensions: Iterable[str] = (".txt", ".md")) -> list[Path]:
    """Files (any extension), directories (recursive, `extensions` only) and globs -> sorted, deduplicated files."""
    return [p for p, _ in _resolve_keyed(inputs, extensions)]


def _resolve_keyed(inputs: Sequence[str | Path], extensions: Iterable[str],
                   check_text: bool = True) -> list[tuple[Path, str]]:
    """resolve_inputs, each file with its split key: its path relative to the directory it was found in, or its name.

    `check_text=False` leaves check_text_file to the caller (prepare: only when it is going to read them)."""
    exts = _normalize_extensions(extensions)
    found: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_file():
            found.append((p, p.name))
        elif p.is_dir():
            found.extend(_scan_dir(p, exts))
        elif any(c in str(item) for c in "*?["):
            import glob

            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise DataError(f"input glob {str(item)!r} matches no file")
            for m in map(Path, matches):
                if m.is_file():
                    found.append((m, m.name))
                elif m.is_dir():
                    found.extend(_scan_dir(m, exts))
        else:
            raise DataError(f"input {str(item)!r} does not exist (give text files, directories, globs or .jsonl files)")
    seen: set[Path] = set()
    unique = []
    for p, key in found:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            if check_text:
                check_text_file(r)
            unique.append((r, key))
    return unique


SNIFF_BYTES = 1 << 16
MAX_INVALID_SHARE = 0.01


def check_text_file(path: Path) -> None:
    """Refuse a file whose start is not UTF-8 text (NUL bytes, or over 1% undecodable bytes): a binary
    file given by mistake would otherwise be 'tokenized' into a stream of replacement characters."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if not head:
        return
    text = head.decode("utf-8", errors="replace")
    invalid = text.count("\ufffd") - head.decode("utf-8", errors="ignore").count("\ufffd")
    if len(head) == SNIFF_BYTES:  # a multi-byte character cut at the sniff's end is not an error
        invalid = max(invalid - 1, 0)
    if b"\x00" in head or invalid > MAX_INVALID_SHARE * len(text):
        why = "NUL bytes" if b"\x00" in head else f"{invalid} undecodable bytes in its first {len(head):,}"
        raise DataError(f"input {path} does not look like UTF-8 text ({why}); give text files, or choose "
                        "which files of a directory are read with --ext")


def _source_records(paths: list[Path]) -> list[dict[str, Any]]:
    records = []
    for p in paths:
        st = p.stat()
        records.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return records


# --------------------------------------------------------------------------------------------- documents


@dataclass
class _Doc:
    path: Path
    key: str  # decides the document's split (document mode)
    text: str | None = None  # a JSONL document is in memory; a text file is streamed


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def _jsonl_docs(path: Path, key: str, text_field: str) -> Iterator[_Doc]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: no string field {text_field!r}; "
                                "name the field that holds the text with --text-field")
            yield _Doc(path, f"{key}:{lineno}", text)


def _iter_docs(keyed: list[tuple[Path, str]], text_field: str) -> Iterator[_Doc]:
    for p, key in keyed:
        if _is_jsonl(p):
            yield from _jsonl_docs(p, key, text_field)
        else:
            yield _Doc(p, key)


def _open_text(path: Path):
    # errors="replace": a stray invalid byte should not sink a whole corpus; universal newlines as the original
    return open(path, encoding="utf-8", errors="replace")


def _doc_chunks(doc: _Doc) -> Iterator[str]:
    if doc.text is not None:
        for i in range(0, len(doc.text), READ_CHARS):
            yield doc.text[i:i + READ_CHARS]
        return
    with _open_text(doc.path) as f:
        while chunk := f.read(READ_CHARS):
            yield chunk


def _count_chars(doc: _Doc) -> int:
    return len(doc.text) if doc.text is not None else sum(len(c) for c in _doc_chunks(doc))


def _choose_split_mode(paths: list[Path], val_fraction: float) -> str:
    """split_mode of the documents in the inputs (JSONL: lines, counted fast; blank ones too).

    split_mode only grows with the count, so counting stops as soon as it says 'document'.
    """
    n = 0
    for p in paths:
        if not _is_jsonl(p):
            n += 1
            if split_mode(n, val_fraction) == "document":
                return "document"
            continue
        last = b"\n"
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                n += block.count(b"\n")
                last = block[-1:]
                if split_mode(n, val_fraction) == "document":
                    return "document"
        n += last != b"\n"
    return split_mode(n, val_fraction)


def _safe_cut(text: str, end: int) -> int:
    """The last k <= end where text[k-2] is not space, text[k-1] is a newline, text[k] is not space; else 0.

    There the GPT-2 split pattern (tiktoken's, and the ByteLevel pre-tokenizer's) ends a pre-token whatever
    follows: the newline stands alone between two non-space characters. Anywhere a whitespace run touches the
    cut, `\\s+(?!\\S)` would match differently on the two sides, so the tokens of the pieces would differ from
    the tokens of the whole. str.isspace() is a superset of the pattern's \\s, so it errs on the safe side.
    """
    j = text.rfind("\n", 1, min(end, len(text) - 1))  # j = k - 1
    while j > 0:
        if not text[j - 1].isspace() and not text[j + 1].isspace():
            return j + 1
        j = text.rfind("\n", 1, j)
    return 0


def _next_safe_cut(text: str, start: int) -> int:
    """The first safe k >= start (see _safe_cut); 0 when there is none."""
    j = text.find("\n", max(start - 1, 1), len(text) - 1)
    while j > 0:
        if not text[j - 1].isspace() and not text[j + 1].isspace():
            return j + 1
        j = text.find("\n", j + 1, len(text) - 1)
    return 0


def _cut_pieces(chunks: Iterable[str], target: int) -> Iterator[tuple[str, bool]]:
    """Regroup text chunks into (piece, is_last) pieces of about `target` characters, cut at safe points.

    A piece ends at the last safe point before `target` characters, else at the first one after.
    """
    buf = ""
    pending: str | None = None
    for chunk in chunks:
        buf = buf + chunk if buf else chunk
        while len(buf) >= target:
            k = _safe_cut(buf, target) or _next_safe_cut(buf, target)
            if k == 0:
                if len(buf) < MAX_PIECE_CHARS:
                    break  # read on until a safe point turns up
                k = buf.rfind("\n") + 1 or target  # bounded memory over exactness at this one cut
            if pending is not None:
                yield pending, False
            pending, buf = buf[:k], buf[k:]
    if buf:
        if pending is not None:
            yield pending, False
        pending = buf
    if pending is not None:
        yield pending, True


def _tag_at(chunks: Iterable[str], cut: int) -> Iterator[tuple[int, str]]:
    """(TRAIN, text) for the first `cut` characters of the stream, then (VAL, text)."""
    pos = 0
    for chunk in chunks:
        end = pos + len(chunk)
        if end <= cut:
            yield TRAIN, chunk
        elif pos >= cut:
            yield VAL, chunk
        else:
            yield TRAIN, chunk[:cut - pos]
            yield VAL, chunk[cut - pos:]
        pos = end


def _goes_to_val(key: str, val_fraction: float) -> bool:
    """Document mode: a uniform draw in [0, 1) from the key's hash, below the fraction = val."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") / 2.0**64
    return u < val_fraction


SMALLER_SPLIT_DOCUMENTS = 10  # documents expected in the smaller split from which split_mode splits by document


def split_mode(num_documents: int, val_fraction: float) -> str:
    """'document' when about SMALLER_SPLIT_DOCUMENTS or more documents are expected in the smaller split, else
    'tail'. Fewer would leave the split's share of tokens to chance (90 documents at 0.1: no val at all 1 time in
    10^4)."""
    return "document" if num_documents * min(val_fraction, 1 - val_fraction) >= SMALLER_SPLIT_DOCUMENTS else "tail"


def documents_for_a_document_split(val_fraction: float) -> int:
    """The fewest documents split_mode splits by document at `val_fraction` (its rule solved for the count)."""
    return math.ceil(SMALLER_SPLIT_DOCUMENTS / min(val_fraction, 1 - val_fraction))


def _segments(keyed: list[tuple[Path, str]], text_field: str, mode: str, val_fraction: float,
              target: int) -> Iterator[tuple[int, str, bool]]:
    """(split, text piece, ends its document side) in corpus order."""
    for doc in _iter_docs(keyed, text_field):
        if mode == "document":
            side = VAL if _goes_to_val(doc.key, val_fraction) else TRAIN
            tagged: Iterator[tuple[int, str]] = ((side, c) for c in _doc_chunks(doc))
        else:
            tagged = _tag_at(_doc_chunks(doc), int((1 - val_fraction) * _count_chars(doc)))
        for side, group in itertools.groupby((t for t in tagged if t[1]), key=lambda t: t[0]):
            for piece, last in _cut_pieces((c for _, c in group), target):
                yield side, piece, last
