"""Typed run configuration: dataclass defaults < preset < TOML file < dotted flags.

Nothing here executes user text: TOML is parsed as data and flag values are converted by
the declared field types. Every refusal names the key, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from gpttrain.errors import ConfigError, shown


@dataclass
class ModelConfig:
    """The GPT architecture (names follow the original script's GPT_CONFIG)."""

    vocab_size: int = 50304
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_embeddings: bool = False


@dataclass
class DataConfig:
    """Where the tokens come from and how windows are cut from them."""

    path: str | None = None  # prepared dir (with meta.json); None = the embedded default corpus
    tokenizer: Literal["gpt2", "bpe", "byte"] = "bpe"
    tokenizer_file: str | None = None
    bpe_vocab_size: int = 8192
    bpe_train_mb: float = 0  # > 0: a bpe tokenizer trains on a sample of about this many MB of a larger train split
    stride: int | None = None  # None = context_length (no overlap, as the original)
    val_fraction: float = 0.1
    text_field: str = "text"
    workers: int = 0  # 0 = all cores


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 6e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    scale_lr_with_world: bool = False  # the original's lr = 5e-4 * world_size
    fused: Literal["auto", "on", "off"] = "auto"  # fused AdamW; auto = on CUDA and CPU (off: a host sync per step)


@dataclass
class TrainConfig:
    """How long, how big, how precise; eval and checkpoint cadence."""

    epochs: int | None = None
    max_steps: int | None = None
    max_tokens: int | None = None
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    # Evaluation every 500 steps on 10 micro-batches of each split (`gpttrain info` counts its share of the
    # model FLOPs for a config: this default stays under 2% at any accumulation).
    eval_every: int = 500
    eval_batches: int = 10
    log_every: int = 10
    seed: int = 1337
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-pure"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    # torch.compile's mode: reduce-overhead / max-autotune use CUDA graphs (worth measuring per model).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # What torch.compile wraps: the whole model, or each transformer block on its own (FSDP2's usual way).
    compile_scope: Literal["model", "blocks"] = "model"
    # Evaluation's forward compiled too, where training compiles the whole model (not blocks, not FSDP): one more
    # graph, built at the first evaluation (and one per odd last-batch size); a failure falls back to eager.
    compile_eval: bool = True
    # scaled_dot_product_attention's kernel: auto = PyTorch's choice; the others pin one (cudnn, flash and
    # efficient need CUDA; math runs anywhere).
    attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    fp8: bool = False  # the blocks' linears in float8 through torchao (bf16-mixed, GPUs with fp8: H100, 4090)
    activation_checkpointing: bool = False
    # Recast the 16-bit weight copies in backward instead of keeping them (bf16/fp16-mixed under torch.compile):
    # 2 bytes per linear weight less memory (about 2.3 GiB at 1.42B) for one more cast of them per micro-step
    # (1.3% fewer tokens/s at 1.42B on an H200). auto = on where the run's memory estimate is over 90% of the GPU's.
    recompute_weight_casts: bool | Literal["auto"] = "auto"
    # Draw each block's dropout masks again in backward from their seeds instead of keeping them (needs compile and
    # --model.drop_rate > 0; not with activation checkpointing, which recomputes them already): 2 bytes per token
    # and width per block less memory (0.75 GiB at 1.42B, micro-batch 8), the same masks, so the same losses.
    recompute_dropout_masks: bool = False
    # Chunked head + cross-entropy; auto = on CUDA, except where torch.compile compiles the whole model of a
    # 16-bit run (inductor's fused plain loss is faster there and no larger).
    fused_loss: Literal["auto", "on", "off"] = "auto"
    # The residual stream's dtype under bf16/fp16-mixed: fp32, as autocast leaves it (nanoGPT's numerics), or
    # compute, the 16-bit dtype (as the original script and Megatron keep it, and torchtitan under FSDP): half the
    # bytes in every residual add and LayerNorm input, and (compiled) in the LayerNorm inputs saved for backward.
    # auto = fp32, except under FSDP, which casts every block's input to the compute dtype: compute there (fp32 is
    # refused).
    residual_dtype: Literal["auto", "fp32", "compute"] = "auto"
    # Compile backward together with the gradient accumulation (torch's compiled autograd; needs compile; not FSDP
    # or the CUDA-graph compile modes): from the second micro-step on, each fp32 gradient is added into .grad inside
    # backward's fused kernels instead of by an eager add per parameter (13 ms of a 537 ms step at 1.42B, 8x4, on an
    # H200 profile).
    compiled_autograd: bool = False
    checkpoint_every: int = 0  # 0 = only at the end and on signals
    keep_checkpoints: int = 3
    nonfinite: Literal["skip", "stop"] = "stop"
    max_skipped_steps: int = 10


@dataclass
class DistConfig:
    """torch.distributed settings (the world itself comes from torchrun's environment)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    timeout_s: int = 1800


@dataclass
class LogConfig:
    """What rank 0 reports and where."""

    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 50
    sample_every: int = 1  # in evals; 0 = none at evaluations
    # Also a sample each time the run passes a multiple of this many epochs (the original's 5); 0 = off.
    sample_every_epochs: float = 0.0
    sample_temperature: float = 0.0  # 0 = greedy, as the original; samples use a fixed seed either way
    sample_top_k: int | None = None
    tensorboard: bool = False
    wandb: bool = False
    progress: Literal["auto", "bar", "lines"] = "auto"
    peak_tflops: float | None = None  # per-GPU bf16 peak for MFU; None = look the GPU up


@dataclass
class RunConfig:
    """Where outputs go and which device runs."""

    dir: str = "runs/demo"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    resume: str | None = None  # "auto" or a checkpoint path
    init_from: str | None = None  # a Hugging Face GPT-2 layout directory


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str | None = None
    # Dotted keys set by a TOML file or a flag (not by defaults or the preset): lets later code
    # tell "the user asked for vocab 50304" from "the preset happens to say 50304".
    explicit: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("explicit")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


SECTIONS: tuple[str, ...] = ("model", "data", "optim", "train", "dist", "log", "run")

def _gpt2_model(**geometry: int) -> dict[str, Any]:
    """GPT-2's family: qkv biases, tied head, vocab padded to 50304."""
    return dict(vocab_size=50304, context_length=1024, qkv_bias=True, tie_embeddings=True, **geometry)


# Presets: partial configs, applied over the dataclass defaults.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": dict(vocab_size=512, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0),
        "train": dict(micro_batch_size=4, eval_every=10, eval_batches=2, log_every=1),
        "optim": dict(lr=1e-3),
        "data": dict(tokenizer="byte"),
    },
    "demo": {
        "model": dict(vocab_size=8192, context_length=128, emb_dim=192, n_heads=6, n_layers=4, drop_rate=0.0),
        "train": dict(max_steps=600, micro_batch_size=16, eval_every=100, eval_batches=8, log_every=20),
        "optim": dict(lr=2e-3, warmup_steps=30),
        "data": dict(tokenizer="bpe", bpe_vocab_size=8192),
        # A model this small loops under greedy decoding; a little sampling reads far better.
        "log": dict(sample_tokens=60, sample_every=2, sample_temperature=0.7, sample_top_k=40),
    },
    "gpt2-124m": {
        "model": _gpt2_model(emb_dim=768, n_heads=12, n_layers=12),
        "data": dict(tokenizer="gpt2"),
    },
    "gpt2-355m": {
        "model": _gpt2_model(emb_dim=1024, n_heads=16, n_layers=24),
        "data": dict(tokenizer="gpt2"),
    },
    "gpt2-774m": {
        "model": _gpt2_model(emb_dim=1280, n_heads=20, n_layers=36),
        "data": dict(tokenizer="gpt2"),
    },
    "gpt2-1.5b": {
        "model": _gpt2_model(emb_dim=1600, n_heads=25, n_layers=48),
        "data": dict(tokenizer="gpt2"),
    },
    # The original script's model exactly: 1,416,597,504 parameters.
    "gpt-1.4b": {
        "model": dict(
            vocab_size=50304, context_length=1024, emb_dim=2048, n_heads=16, n_layers=24,
            drop_rate=0.1, qkv_bias=False, tie_embeddings=False,
        ),
        "data": dict(tokenizer="gpt2"),
        "train": dict(micro_batch_size=8, grad_accum_steps=4, epochs=50, eval_every=5, eval_batches=5, log_every=5),
        "optim": dict(lr=5e-4, weight_decay=0.1, beta2=0.999, schedule="constant", grad_clip=0.0,
                      scale_lr_with_world=True),
        "log": dict(sample_every=0, sample_every_epochs=5.0),
    },
}


def _section_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        args = get_args(tp)
        return repr(args[0]) if len(args) == 1 else "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [a for a in get_args(tp) if a is not type(None)]
        optional = len(parts) < len(get_args(tp))
        return " or ".join(_describe(p) for p in parts) + (" (or none)" if optional else "")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(key: str, value: Any, tp: Any, *, from_text: bool) -> Any:
    """Convert `value` to the declared type `tp`, or raise a ConfigError naming `key`."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        if optional and (value is None or (from_text and isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for a in args:
            try:
                return _convert(key, value, a, from_text=from_text)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not {_describe(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; use {_describe(tp)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        truthy, falsy = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
        if from_text and isinstance(value, str) and value.lower() in truthy + falsy:
            return value.lower() in truthy
        raise ConfigError(f"{key}: {value!r} is not true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{key}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a number")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif from_text and isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: {value!r} is not a number")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: {value!r} is not a string")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def _did_you_mean(name: str, choices, prefix: str = "", cutoff: float = 0.6) -> str:
    """' (did you mean PREFIXX?)' for the choice closest to a misspelled `name`, or '' where none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _setting_elsewhere(cfg: Config, name: str) -> str:
    """' (did you mean --SECTION.NAME?)' naming each section with a setting called `name`, for a flag given under
    the wrong or a misspelled section (--train.lr, --trian.lr: --optim.lr); '' where none has one."""
    where = [f"--{section}.{name}" for section in SECTIONS if name in _section_types(type(getattr(cfg, section)))]
    return f" (did you mean {' or '.join(where)}?)" if where else ""


def _apply(cfg: Config, section: str, values: dict[str, Any], *, source: str, from_text: bool) -> list[str]:
    """Set `values` on `cfg.<section>`; returns the dotted keys that were set."""
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown section {section!r}{_did_you_mean(section, SECTIONS)}; sections are "
                          f"{', '.join(SECTIONS)}")
    obj = getattr(cfg, section)
    hints = _section_types(type(obj))
    set_keys = []
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in hints:
            valid = ", ".join(hints)
            raise ConfigError(f"{source}: unknown key {key!r}{_did_you_mean(name, hints, f'{section}.')}; "
                              f"{section} has: {valid}")
        setattr(obj, name, _convert(f"{source}: {key}", value, hints[name], from_text=from_text))
        set_keys.append(key)
    return set_keys


def apply_preset(cfg: Config, name: str, given_as: str = "--preset:") -> None:
    """The preset's settings into `cfg`; `given_as` names where the name came from in a refusal."""
    if name not in PRESETS:
        raise ConfigError(f"{given_as} unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    for section, values in PRESETS[name].items():
        _apply(cfg, section, values, source=f"preset {name}", from_text=False)
    cfg.preset = name


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config: {str(p)!r} is a directory; give the path of a TOML file (see configs/)")
    if not p.is_file():
        raise ConfigError(f"--config: file {str(p)!r} does not exist; give the path of a TOML file (see configs/)")
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {p} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {p} is not UTF-8 text ({e.reason} at byte {e.start}); TOML files are "
                          "UTF-8") from None
    except ValueError as e:  # (after its subclasses) Python's limit on an integer's digits (4300), met reading one
        reason = str(e).split(";")[0]  # (its advice, to raise the limit, is for programs, not for a setting)
        raise ConfigError(f"--config: {p} holds a value too large to read ({reason}); no setting takes one") \
            from None


def parse_dotted(args: list[str], command: str | None = None) -> list[tuple[str, str]]:
    """`["--model.n_layers", "6", "--optim.lr=3e-4"]` -> `[("model.n_layers", "6"), ("optim.lr", "3e-4")]`.
    `command` names the help an error points to (`gpttrain COMMAND --help`)."""
    help_hint = f"gpttrain {command} --help" if command else "--help"
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a.split("=", 1)[0]:
            raise ConfigError(f"unrecognized argument {a!r}; config flags look like --section.key VALUE "
                              f"(sections: {', '.join(SECTIONS)}); see {help_hint}")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{a}: missing value")
            k, v = a[2:], args[i + 1]
            i += 2
        section, _, name = k.partition(".")
        out.append((f"{section}.{name.replace('-', '_')}", v))
    return out


def resolve(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[tuple[str, str]] | None = None,
    base: tuple[dict[str, Any], str] | None = None,
) -> Config:
    """Build a Config from defaults < preset < TOML < dotted overrides, then validate it. `base`: a saved config
    (`to_dict`'s, and where it was read) to start from instead of the defaults, its keys explicit (bar one: see
    below)."""
    cfg = Config()
    explicit: list[str] = []
    if base is not None:  # validated with the flags on top, below: they may mend what no longer validates
        saved, source = base
        for section, values in saved.items():
            if section == "preset":
                cfg.preset = values
            elif section not in SECTIONS or not isinstance(values, dict):
                raise ConfigError(f"{source}: unexpected entry {section!r}")
            else:
                # Explicit, as given, except records of how the run went: the tokenizer's name (the data decides
                # it) and how it was launched (torchrun decides that): not requests to check the data or warn about.
                explicit += [k for k in _apply(cfg, section, values, source=source, from_text=False)
                             if k not in ("data.tokenizer", "dist.strategy", "dist.backend")]
    toml = load_toml(config_file) if config_file is not None else {}
    from_file = preset is None and "preset" in toml
    preset = preset if preset is not None else toml.pop("preset", None)
    toml.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"--config: {config_file}: 'preset' must be a string, got {preset!r}")
        # Said as the file says it, not as a flag the user did not give.
        apply_preset(cfg, preset, f"--config: {config_file}: preset =" if from_file else "--preset:")
    for section, values in toml.items():
        if not isinstance(values, dict):
            if section in SECTIONS:
                raise ConfigError(f"--config: {config_file}: [{section}] must be a table, got {values!r}")
            raise ConfigError(f"--config: {config_file}: unknown key {section!r}; "
                              f"top-level keys are preset and the tables {', '.join(SECTIONS)}")
        explicit += _apply(cfg, section, values, source=f"--config {config_file}", from_text=False)
    for key, value in overrides or []:
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            hint = _setting_elsewhere(cfg, name) or _did_you_mean(section, SECTIONS, "section ")
            raise ConfigError(f"--{key}: unknown section {section!r}{hint}; sections are {', '.join(SECTIONS)}")
        hints = _section_types(type(getattr(cfg, section)))
        if name not in hints:
            valid = ", ".join(f"--{section}.{h}" for h in hints)
            hint = _setting_elsewhere(cfg, name) or _did_you_mean(name, hints, f"--{section}.")
            raise ConfigError(f"--{key}: no such setting{hint}; {section} has: {valid}")
        setattr(getattr(cfg, section), name, _convert(f"--{key}", value, hints[name], from_text=True))
        explicit.append(key)
    cfg.explicit = frozenset(explicit)
    validate_config(cfg)
    return cfg


def from_dict(d: dict[str, Any], source: str = "saved config") -> Config:
    """Rebuild a Config saved by `to_dict` (checkpoints, run dirs); unknown keys are refused, naming `source`."""
    return resolve(base=(d, source))


def _flag(section: str, name: str) -> str:
    return f"--{section}.{name}"


MAX_SEED = 2**32 - 1  # a seed every generator takes (numpy's legacy one, torch's, Python's), plus ranks and steps
# Sampling temperatures other than 0 (greedy): past these, logits / temperature overflow or turn -inf into NaN.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6


def check_seed(label: str, seed: int) -> None:
    """An integer every generator takes. `label` starts the message, as check_temperature's does."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{label}{shown(seed)} must be an integer in [0, {MAX_SEED}]")


def check_temperature(label: str, temperature: float) -> None:
    """0 (greedy) or a range where logits / temperature stays finite (NaN and negatives fall outside). `label`
    starts the message, before the value: a flag, a colon and a space (`--log.sample_temperature: `) or a keyword
    (`temperature=`)."""
    if temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        why = ("below that it is greedy decoding in effect" if temperature < MIN_TEMPERATURE else
               "above that the logits all round to the same value: uniform sampling in effect")
        raise ConfigError(f"{label}{shown(temperature)} must be 0 (greedy) or between {MIN_TEMPERATURE:g} and "
                          f"{MAX_TEMPERATURE:g} ({why})")


def validate_config(cfg: Config) -> None:
    """Refuse impossible values with one message naming the flag, the value and what is allowed."""
    m = cfg.model
    for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        v = getattr(m, name)
        if v < 1:
            raise ConfigError(f"{_flag('model', name)}: {v} must be a positive integer")
    if m.emb_dim % m.n_heads != 0:
        raise ConfigError(f"--model.n_heads: {m.n_heads} does not divide --model.emb_dim {m.emb_dim}; "
                          f"choose n_heads among the divisors of {m.emb_dim}")
    if not 0.0 <= m.drop_rate < 1.0:
        raise ConfigError(f"--model.drop_rate: {m.drop_rate} must be in [0, 1)")
    d = cfg.data
    if d.bpe_vocab_size < 257 + 1:
        raise ConfigError(f"--data.bpe_vocab_size: {d.bpe_vocab_size} must be at least 258 "
                          "(256 bytes + end-of-text + 1 merge)")
    if d.bpe_train_mb < 0:
        raise ConfigError(f"--data.bpe_train_mb: {d.bpe_train_mb} must be >= 0 (0 = train the bpe tokenizer on "
                          "all of the train split)")
    if d.stride is not None and d.stride < 1:
        raise ConfigError(f"--data.stride: {d.stride} must be a positive integer (or none for context_length)")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"--data.val_fraction: {d.val_fraction} must be between 0 and 1 (exclusive)")
    if d.workers < 0:
        raise ConfigError(f"--data.workers: {d.workers} must be >= 0 (0 = all cores)")
    o = cfg.optim
    if o.lr <= 0:
        raise ConfigError(f"--optim.lr: {o.lr} must be positive")
    if o.weight_decay < 0:
        raise ConfigError(f"--optim.weight_decay: {o.weight_decay} must be >= 0")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise ConfigError(f"{_flag('optim', name)}: {getattr(o, name)} must be in [0, 1)")
    if o.eps <= 0:
        raise ConfigError(f"--optim.eps: {o.eps} must be positive")
    if o.grad_clip < 0:
        raise ConfigError(f"--optim.grad_clip: {o.grad_clip} must be >= 0 (0 disables clipping)")
    if o.warmup_steps < 0:
        raise ConfigError(f"--optim.warmup_steps: {o.warmup_steps} must be >= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"--optim.min_lr_ratio: {o.min_lr_ratio} must be in [0, 1]")
    t = cfg.train
    for name in ("micro_batch_size", "grad_accum_steps", "eval_every", "eval_batches", "log_every", "keep_checkpoints"):
        v = getattr(t, name)
        if v < 1:
            raise ConfigError(f"{_flag('train', name)}: {v} must be at least 1")
    for name in ("epochs", "max_steps", "max_tokens"):
        v = getattr(t, name)
        if v is not None and v < 1:
            raise ConfigError(f"{_flag('train', name)}: {v} must be at least 1 (or none)")
    for name in ("checkpoint_every", "max_skipped_steps"):
        v = getattr(t, name)
        if v < 0:
            raise ConfigError(f"{_flag('train', name)}: {v} must be >= 0")
    check_seed("--train.seed: ", t.seed)
    if cfg.dist.timeout_s < 1:
        raise ConfigError(f"--dist.timeout_s: {cfg.dist.timeout_s} must be at least 1")
    lg = cfg.log
    if lg.sample_tokens < 1:
        raise ConfigError(f"--log.sample_tokens: {lg.sample_tokens} must be at least 1")
    check_temperature("--log.sample_temperature: ", lg.sample_temperature)
    if lg.sample_top_k is not None and lg.sample_top_k < 1:
        raise ConfigError(f"--log.sample_top_k: {lg.sample_top_k} must be at least 1 (or none)")
    if lg.sample_every < 0:
        raise ConfigError(f"--log.sample_every: {lg.sample_every} must be >= 0 (0: no samples at evaluations)")
    if lg.sample_every_epochs < 0:
        raise ConfigError(f"--log.sample_every_epochs: {lg.sample_every_epochs} must be >= 0 (0 = off)")
    if lg.peak_tflops is not None and lg.peak_tflops <= 0:
        raise ConfigError(f"--log.peak_tflops: {lg.peak_tflops} must be positive")


def field_help() -> list[tuple[str, str, str]]:
    """(flag, type description, default) for every dotted setting, for --help."""
    cfg = Config()
    rows = []
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for name, tp in _section_types(type(obj)).items():
            rows.append((f"--{section}.{name}", _describe(tp), repr(getattr(obj, name))))
    return rows
