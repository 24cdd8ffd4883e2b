"""`gpttrain train` around the Trainer: the data (prepared on the way if need be), the loaders, the model's
vocabulary, then `Trainer.fit()` inside a distributed session."""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from pathlib import Path

from gpttrain import distributed as distmod
from gpttrain.config import Config
from gpttrain.distributed import DistInfo
from gpttrain.errors import ConfigError, DataError, GpttrainError
from gpttrain.monitor import console_shows_info, run_logging
from gpttrain.settings import check_run_settings, round_up
from gpttrain.trainer import Trainer

log = logging.getLogger("gpttrain")


def resolve_vocab(cfg: Config, tokenizer_vocab: int) -> int:
    """The model's vocabulary: the data's, rounded up to a multiple of 64, unless given explicitly."""
    if "model.vocab_size" in cfg.explicit:
        if cfg.model.vocab_size < tokenizer_vocab:
            raise ConfigError(f"--model.vocab_size: {cfg.model.vocab_size} is smaller than the data's tokenizer "
                              f"vocabulary ({tokenizer_vocab}); use at least {tokenizer_vocab} or leave it unset")
        return cfg.model.vocab_size
    return round_up(tokenizer_vocab, 64)


def ensure_data(cfg: Config, info: DistInfo) -> Path:
    """The prepared data dir for this run, as rank 0 finds it (preparing it there when needed): every rank takes
    rank 0's answer, and its verdict, so none takes a collective the others skip (`open_data` then opens the dir
    on every rank)."""
    path = cfg.data.path
    try:
        return distmod.on_main(lambda: _ensure_data_here(cfg), info)
    except GpttrainError as e:
        msg = _PREPARE_FLAG.sub(lambda m: TRAIN_FLAG_OF[m.group(1)], str(e))  # the flags `train` takes
        raise DataError(msg if path is None or msg.startswith("--") else f"--data {path}: {msg}") from None


def is_prepared(path: str | Path) -> bool:
    """--data: True for a prepared dir (its meta.json), False for text to prepare; refused where it is neither
    (absent, or shards without meta.json)."""
    from gpttrain.data.shards import META_NAME

    p = Path(path)
    if (p / META_NAME).is_file():
        return True
    if not p.exists():
        raise DataError(f"--data: {str(path)!r} does not exist; give a dir made by `gpttrain prepare ... --out DIR`, "
                        "or a text file or directory to prepare")
    if p.is_dir() and any(p.glob("*.bin")):
        raise DataError(f"--data: {path} holds shards but no meta.json (an interrupted prepare?); "
                        f"run `gpttrain prepare ... --out {path}` again")
    return False


def _ensure_data_here(cfg: Config) -> Path:
    from gpttrain.data.prepare import prepare

    path = cfg.data.path
    if path is not None and is_prepared(path):
        return Path(path)
    if path is None:
        out = Path("data") / f"stdlib-{cfg.data.tokenizer}"
        if cfg.data.tokenizer == "bpe":
            out = Path(f"{out}-{cfg.data.bpe_vocab_size}")
        inputs: list[str] = []
        what = "the embedded corpus (Python's standard library sources)"
    else:
        p = Path(path)
        # The full path and the tokenizer settings in the name: a/train.txt and b/train.txt never share a dir.
        key = f"{p.resolve()}|{cfg.data.tokenizer}|{cfg.data.bpe_vocab_size}|{cfg.data.tokenizer_file}"
        if cfg.data.bpe_train_mb:  # it decides the tokenizer too (absent by default: existing dirs keep names)
            key += f"|{cfg.data.bpe_train_mb}"
        out = Path("data") / f"{p.stem}-{cfg.data.tokenizer}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        inputs = [str(p)]
        what = str(p)
    log.info("data: %s, tokenizer %s, in %s", what, cfg.data.tokenizer, out)
    prepare(inputs, out, tokenizer=cfg.data.tokenizer, tokenizer_file=cfg.data.tokenizer_file,
            bpe_vocab_size=cfg.data.bpe_vocab_size, bpe_train_mb=cfg.data.bpe_train_mb,
            val_fraction=cfg.data.val_fraction,
            text_field=cfg.data.text_field, workers=cfg.data.workers,
            progress=console_shows_info())  # -q: no progress bars either
    return out


# `gpttrain prepare`'s flags, as `gpttrain train` spells them: prepare's messages name them.
TRAIN_FLAG_OF = {"val-fraction": "--data.val_fraction", "tokenizer-file": "--data.tokenizer_file",
                 "tokenizer": "--data.tokenizer", "vocab-size": "--data.bpe_vocab_size",
                 "bpe-train-mb": "--data.bpe_train_mb", "text-field": "--data.text_field", "workers": "--data.workers"}
# Not within a word or path, and not where a message quotes a `gpttrain prepare --...` command.
_PREPARE_FLAG = re.compile(r"(?<![\w-])(?<!prepare )--(" + "|".join(sorted(TRAIN_FLAG_OF, key=len, reverse=True))
                           + r")(?![\w-])")


def check_resume(cfg: Config, info: DistInfo) -> None:
    """`resume.check_resume_request` and the model settings the resume would refuse, on rank 0, its verdict on every
    rank (as the resume itself decides)."""
    from gpttrain.resume import check_model_before_data, check_resume_request

    def check() -> None:
        check_resume_request(Path(cfg.run.dir), cfg.run.resume)
        if cfg.run.resume:
            check_model_before_data(cfg, Path(cfg.run.dir))

    distmod.on_main(check, info)


def build_loaders(cfg: Config, info: DistInfo, data_dir: Path):
    from gpttrain.data.loader import WindowLoader

    common = dict(context_length=cfg.model.context_length, stride=cfg.data.stride,
                  micro_batch_size=cfg.train.micro_batch_size, rank=info.rank, world_size=info.world_size,
                  seed=cfg.train.seed, device=info.device)
    train = WindowLoader(data_dir, "train", shuffle=True, **common)
    val = WindowLoader(data_dir, "val", shuffle=False, **common)
    return train, val


def open_data(cfg: Config, info: DistInfo, data_dir: Path):
    """The run's config fitted to the data in `data_dir` (its tokenizer and vocabulary), the tokenizer and the
    train and val loaders; no collective (`run_training` calls it under `on_every`)."""
    from gpttrain.data.prepare import open_tokenizer

    tokenizer = open_tokenizer(data_dir)
    if "data.tokenizer" in cfg.explicit and tokenizer.kind != cfg.data.tokenizer:
        raise ConfigError(f"--data.tokenizer {cfg.data.tokenizer}: {data_dir} was prepared with the "
                          f"{tokenizer.kind} tokenizer; drop the flag to train with it, or prepare the text "
                          f"again with --tokenizer {cfg.data.tokenizer} into another --out")
    vocab = resolve_vocab(cfg, tokenizer.vocab_size)
    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size = vocab
    cfg.data.path = str(data_dir)
    cfg.data.tokenizer = tokenizer.kind  # the run records the tokenizer it trains with
    if not info.distributed:  # and how it ran: one process shards nothing, its checkpoints hold the full model
        cfg.dist.strategy = "auto"
    train_loader, val_loader = build_loaders(cfg, info, data_dir)
    return cfg, tokenizer, train_loader, val_loader


def run_training(cfg: Config, quiet: bool = False, note: str | None = None) -> int:
    """Train `cfg`; `note`, a line about how the run came about (the CLI's for a bare `gpttrain train`), is
    logged first, so the run's train.log has it too."""
    with (distmod.session(cfg.run.device, cfg.dist.backend, cfg.dist.timeout_s) as info,
          run_logging(info.is_main, quiet)):
        if note:
            log.info("%s", note)

        # Refused settings: before any data is prepared; one verdict for every rank (a node whose GPUs lack bf16
        # or fp8 is named, not left silent while the others wait in a collective).
        distmod.on_every(lambda: check_run_settings(cfg, info), info)
        ignored = [f"--dist.{k} {getattr(cfg.dist, k)}" for k in ("strategy", "backend")
                   if getattr(cfg.dist, k) != "auto" and f"dist.{k}" in cfg.explicit]
        if ignored and not info.distributed:
            log.warning("%s: one process (not started by torchrun), so nothing to distribute; launch with "
                        "torchrun --nproc_per_node N to use them", " and ".join(ignored))
        check_resume(cfg, info)  # and a --resume that cannot be: before the data too
        if cfg.run.init_from:
            from gpttrain.export import check_init_from

            distmod.on_every(lambda: check_init_from(cfg.run.init_from), info)  # and an --init-from that is none
        data_dir = ensure_data(cfg, info)
        # Every rank reads the data itself: one that cannot (a node without the dir, a shard of its own) is
        # named in the verdict every rank raises, which rank 0 prints.
        cfg, tokenizer, train_loader, val_loader = distmod.on_every(lambda: open_data(cfg, info, data_dir), info)
        log.info("resolved config:\n%s", cfg.to_json())
        trainer = Trainer(cfg, info, train_loader=train_loader, val_loader=val_loader, tokenizer=tokenizer)
        try:
            return trainer.fit()
        finally:
            trainer.close()
