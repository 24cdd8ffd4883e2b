"""On-disk formats of a prepared data dir (token shards, meta.json) and how it is written safely.

A shard is a fixed 32-byte header, then the tokens.

Header (little-endian), 32 bytes:
    magic      8 bytes   b"GPTTOKS\\0"
    version    uint32    SHARD_VERSION
    itemsize   uint32    2 (uint16 tokens) or 4 (uint32 tokens)
    count      uint64    number of tokens that follow
    reserved   8 bytes   zero

The count is written when a shard is closed, after every token is on disk, so a shard cut short
by a crash reads as count 0 with a size that does not match and is refused by `read_shard`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import struct
from pathlib import Path

import numpy as np

from gpttrain.errors import DataError

FORMAT_VERSION = 1  # of meta.json and the layout of a prepared dir
META_NAME = "meta.json"
TOKENIZER_FILES = {"bpe": "tokenizer.json", "gpt2": "gpt2.tiktoken"}  # the tokenizer's payload, beside the shards
SPLITS = ("train", "val")
MAGIC = b"GPTTOKS\0"
SHARD_VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")
HEADER_SIZE = HEADER.size  # 32
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}

logger = logging.getLogger("gpttrain")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (ids < 65536), else uint32."""
    return _DTYPES[2] if vocab_size <= 65536 else _DTYPES[4]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def read_header(path: str | Path) -> tuple[np.dtype, int]:
    """Check a shard's header and size; return (dtype, token count). DataError names the file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except OSError as e:
        raise DataError(f"shard {p}: cannot read it ({e.strerror or e}); prepare the data again") from None
    if len(raw) < HEADER_SIZE:
        raise DataError(f"shard {p}: {size} bytes is shorter than the {HEADER_SIZE}-byte header; "
                        "the file is truncated, prepare the data again")
    magic, version, itemsize, count = HEADER.unpack(raw)
    if magic != MAGIC:
        raise DataError(f"shard {p}: bad magic {magic!r} (expected {MAGIC!r}); not a gpttrain token shard")
    if version != SHARD_VERSION:
        raise DataError(f"shard {p}: format version {version}, this gpttrain reads version {SHARD_VERSION}; "
                        "prepare the data again")
    if itemsize not in _DTYPES:
        raise DataError(f"shard {p}: token size {itemsize} bytes is not 2 or 4; the header is corrupt")
    expected = HEADER_SIZE + count * itemsize
    if size != expected:
        raise DataError(f"shard {p}: {size} bytes on disk, the header promises {count} tokens = {expected} bytes; "
                        "the file is truncated or corrupt, prepare the data again")
    return _DTYPES[itemsize], count


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens (read-only) after checking its header and size."""
    dtype, count = read_header(path)
    if count == 0:
        return np.empty(0, dtype=dtype)  # mmap cannot map zero bytes
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))


def _umask() -> int:
    """This process's umask, read without changing it where /proc says it (os.umask can only set it, and a
    moment at 0 would make another thread's new files world-writable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_modes(root: Path) -> None:
    """Give `root` and everything under it the modes the umask gives new files and folders: safetensors writes
    its file 0600 and tempfile.mkdtemp makes 0700, which would hide a checkpoint or an export from the other
    users of a shared run dir (a multi-node run's). Best effort: a filesystem that refuses chmod (another user's
    files, some network mounts) leaves the modes as they are, with a warning, and the save goes on."""
    umask = _umask()
    try:
        os.chmod(root, 0o777 & ~umask)
        for p in Path(root).rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
    except OSError as e:
        logger.warning("could not set the usual permissions under %s (%s); other users may not read it", root, e)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardWriter:
    """Appends tokens to `<split>-00000.bin`, `<split>-00001.bin`, ... in `directory`, rotating at `shard_tokens`.

    Shards are opened lazily, so a split that receives no tokens writes no file.
    """

    def __init__(self, directory: str | Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be >= 1")
        self.directory = Path(directory)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.names: list[str] = []
        self._file = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        pos = 0
        while pos < len(tokens):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._count
            part = tokens[pos:pos + room]
            self._file.write(part.tobytes())
            self._count += len(part)
            pos += len(part)
            if self._count == self.shard_tokens:
                self._finalize()

    def close(self) -> list[str]:
        if self._file is not None:
            self._finalize()
        return list(self.names)

    def abort(self) -> None:
        """Close without finishing the header (the caller removes the directory)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> None:
        name = shard_name(self.split, len(self.names))
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 - stays open across write() calls
        # A zero count until _finalize: a crash leaves a shard whose size disagrees with its header.
        self._file.write(HEADER.pack(MAGIC, SHARD_VERSION, self.dtype.itemsize, 0))
        self._count = 0
        self.names.append(name)

    def _finalize(self) -> None:
        f = self._file
        f.flush()
        os.fsync(f.fileno())  # tokens on disk before the header says they are there
        f.seek(0)
        f.write(HEADER.pack(MAGIC, SHARD_VERSION, self.dtype.itemsize, self._count))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None


def load_meta(data_dir: str | Path) -> dict:
    """Read `data_dir/meta.json`; DataError naming the dir when it is missing, corrupt or of another version."""
    d = Path(data_dir)
    again = f"run `gpttrain prepare INPUT... --out {d}`"
    path = d / META_NAME
    if not path.is_file():
        raise DataError(f"{d} has no {META_NAME}; {again} first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} is unreadable or not JSON ({type(e).__name__}); {again} again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} does not hold a JSON object; {again} again")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {meta.get('format_version')!r}, this gpttrain reads "
                        f"{FORMAT_VERSION}; {again} again")
    try:
        for split in SPLITS:
            info = meta["splits"][split]
            if not isinstance(info["tokens"], int) or not all(isinstance(n, str) for n in info["shards"]):
                raise TypeError
        if not isinstance(meta["tokenizer"], dict):
            raise TypeError
    except (KeyError, TypeError):
        raise DataError(f"{path} lacks the tokenizer or the train/val split entries; {again} again") from None
    return meta


# ---- writing a prepared dir safely -------------------------------------------------------------------


def verify_dir(out: Path, meta: dict) -> str | None:
    """None when every file the meta names is there and whole; else what is wrong."""
    try:
        for split in SPLITS:
            info = meta["splits"][split]
            total = sum(read_header(out / name)[1] for name in info["shards"])
            if total != info["tokens"]:
                return f"the {split} shards hold {total} tokens, meta.json says {info['tokens']}"
        name = meta.get("tokenizer_file")
        if name is not None:
            path = out / name
            if not path.is_file():
                return f"{path} is missing"
            want = meta["tokenizer"].get("sha256")
            # bpe's sha256 is of the JSON text; gpt2's of the ranks file: both are the bytes on disk
            if want is not None and file_sha256(path) != want:
                return f"{path} does not match the tokenizer in meta.json"
    except (DataError, KeyError, TypeError) as e:
        return str(e)
    return None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks (shards, checkpoints and inputs can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file, fsync and rename: `path` holds either the old or the whole new bytes."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _owned_files(out: Path) -> list[Path]:
    """The files a prepare run writes in `out`: only these are ever removed there."""
    names = set(TOKENIZER_FILES.values())
    owned = []
    for p in out.iterdir():
        stem, _, ext = p.name.partition(".")
        split, _, num = stem.partition("-")
        if p.is_file() and (p.name in names or (ext == "bin" and split in SPLITS and num.isdigit())):
            owned.append(p)
    return owned


def make_temp_dir(out: Path) -> Path:
    """A fresh `.<out>.tmp-<host>-<pid>` beside `out` (same filesystem, so files move in by rename)."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    prefix = f".{out.name}.tmp-{host}-"
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(prefix + "*"):  # left by a killed run on this host
        pid = stale.name[len(prefix):]
        if pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("removing %s, left by an interrupted prepare", stale)
            remove_tree(stale)
    tmp = out.parent / f"{prefix}{os.getpid()}"
    remove_tree(tmp)
    tmp.mkdir()
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def install(tmp: Path, out: Path, meta: dict) -> None:
    """Move the finished files into `out`; meta.json goes last, so `out` looks complete only when it is."""
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META_NAME
    if meta_path.exists():
        meta_path.unlink()  # the old data stops looking complete before any of its files goes
        fsync_dir(out)
    for old in _owned_files(out):
        old.unlink()
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    fsync_dir(out)
    write_atomic(meta_path, (json.dumps(meta, indent=1) + "\n").encode("utf-8"))
