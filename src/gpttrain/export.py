"""Export to the Hugging Face GPT-2 layout (config.json + model.safetensors) and load it back.

HF's GPT-2 stores its linear layers as `Conv1D`, whose weight is (in_features, out_features): the
transpose of our `nn.Linear` weights. Its fused `c_attn` splits q|k|v along the output dimension,
the same order as our `attn.qkv`. GPT-2 always has qkv biases; a model without them is written
with zero biases, and those zeros are dropped again on the way back.

Only safetensors and JSON are read: a pickle (`pytorch_model.bin`) is refused, never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gpttrain.config import ModelConfig
from gpttrain.data.shards import default_modes
from gpttrain.errors import ConfigError

log = logging.getLogger("gpttrain")

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses
HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation, as in model.py
_HF_DEFAULTS: dict[str, Any] = {  # GPT2Config's defaults, for keys a config.json leaves out
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1,
    "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
}
# ModelConfig fields whose GPT-2 meaning has been checked. A new field must be added here (and to
# `check_hf_compatible` when some of its values have no GPT-2 equivalent) before export accepts it.
_MAPPED_FIELDS = frozenset({"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate",
                            "qkv_bias", "tie_embeddings"})
_IGNORED_HF_KEYS = ("attn.bias", "attn.masked_bias")  # old GPT-2 files store the causal mask as buffers

# (our suffix, HF suffix, transposed) for the parameters of block i: ours "blocks.{i}.", HF "h.{i}.".
_BLOCK_MAP: tuple[tuple[str, str, bool], ...] = (
    ("norm1.weight", "ln_1.weight", False),
    ("norm1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True),
    ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True),
    ("attn.proj.bias", "attn.c_proj.bias", False),
    ("norm2.weight", "ln_2.weight", False),
    ("norm2.bias", "ln_2.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True),
    ("mlp.fc.bias", "mlp.c_fc.bias", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", True),
    ("mlp.proj.bias", "mlp.c_proj.bias", False),
)
_TOP_MAP: tuple[tuple[str, str], ...] = (
    ("tok_emb.weight", "transformer.wte.weight"),
    ("pos_emb.weight", "transformer.wpe.weight"),
    ("final_norm.weight", "transformer.ln_f.weight"),
    ("final_norm.bias", "transformer.ln_f.bias"),
)


# ---------------------------------------------------------------------------------------------
# Compatibility and configs


def check_hf_compatible(cfg: ModelConfig) -> list[str]:
    """Everything about `cfg` that the GPT-2 layout cannot express, one message per problem (empty = fine)."""
    problems = []
    for f in dataclasses.fields(cfg):
        if f.name not in _MAPPED_FIELDS:
            problems.append(f"--model.{f.name}: has no known GPT-2 equivalent (teach gpttrain.export about it)")
    if cfg.n_heads < 1 or cfg.emb_dim % cfg.n_heads != 0:
        problems.append(f"--model.n_heads: {cfg.n_heads} does not divide --model.emb_dim {cfg.emb_dim}")
    return problems


def _require_hf_compatible(cfg: ModelConfig) -> None:
    problems = check_hf_compatible(cfg)
    if problems:
        raise ConfigError("cannot export to the Hugging Face GPT-2 layout: " + "; ".join(problems))


def hf_config(cfg: ModelConfig, *, eot_id: int | None = None, dtype: torch.dtype = torch.float32,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `config.json` of the HF GPT-2 layout for `cfg`."""
    d: dict[str, Any] = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,  # = 4 * n_embd
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if extra:
        d.update(extra)
    return d


def hf_config_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a HF GPT-2 `config.json` dict (GPT2Config's defaults for missing keys).

    GPT-2 has qkv biases, so `qkv_bias` is True; `drop_rate` comes from `resid_pdrop`. Settings our
    model cannot reproduce are refused with a ConfigError naming the key.
    """
    def get(key: str) -> Any:
        return hf.get(key, _HF_DEFAULTS.get(key))

    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported; only 'gpt2' maps to gpttrain")
    act = get("activation_function")
    if act not in HF_ACTIVATIONS:
        raise ConfigError(f"config.json: activation_function {act!r} is not supported; gpttrain's MLP uses the "
                          f"tanh GELU ({' or '.join(HF_ACTIVATIONS)})")
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        v = get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"config.json: {key} {v!r} must be a positive integer")
    n_embd = get("n_embd")
    n_inner = get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise ConfigError(f"config.json: n_inner {n_inner} is not supported; gpttrain's MLP is 4 x n_embd "
                          f"({4 * n_embd})")
    eps = get("layer_norm_epsilon")
    if not isinstance(eps, (int, float)) or abs(eps - LAYER_NORM_EPS) > 1e-12:
        raise ConfigError(f"config.json: layer_norm_epsilon {eps!r} is not supported; gpttrain uses {LAYER_NORM_EPS}")
    if get("scale_attn_weights") is not True:
        raise ConfigError("config.json: scale_attn_weights false is not supported; gpttrain scales by 1/sqrt(head_dim)")
    if get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError("config.json: scale_attn_by_inverse_layer_idx true is not supported")
    if get("add_cross_attention"):
        raise ConfigError("config.json: add_cross_attention true is not supported (gpttrain is decoder-only)")
    drop = get("resid_pdrop")
    if not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
        raise ConfigError(f"config.json: resid_pdrop {drop!r} must be in [0, 1)")
    if any(get(k) != drop for k in ("embd_pdrop", "attn_pdrop")):
        log.warning("config.json: embd_pdrop/attn_pdrop differ from resid_pdrop; gpttrain uses one drop_rate = %s",
                    drop)
    cfg = ModelConfig(
        vocab_size=get("vocab_size"),
        context_length=get("n_positions"),
        emb_dim=n_embd,
        n_heads=get("n_head"),
        n_layers=get("n_layer"),
        drop_rate=float(drop),
        qkv_bias=True,
        tie_embeddings=bool(get("tie_word_embeddings")),
    )
    problems = check_hf_compatible(cfg)
    if problems:
        raise ConfigError("config.json: " + "; ".join(problems))
    return cfg


# ---------------------------------------------------------------------------------------------
# Name and layout mapping


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for `cfg`, from a model on the meta device (no memory)."""
    from gpttrain.model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _is_tied(model: nn.Module) -> bool:
    head, emb = model.out_head.weight, model.tok_emb.weight
    return head is emb or (head.device == emb.device and head.data_ptr() == emb.data_ptr())


def _check_tie(model: nn.Module, cfg: ModelConfig) -> None:
    """A config that says "tied" must describe a model whose head really is the embedding, or the
    export would silently drop a head that was trained on its own."""
    if cfg.tie_embeddings and not _is_tied(model) and not torch.equal(model.out_head.weight, model.tok_emb.weight):
        raise ConfigError("--model.tie_embeddings is true but the model's output head is a separate tensor "
                          "(was the tie lost when the model was moved or materialised?); re-tie it before export")


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under HF GPT2LMHeadModel names, on the CPU, contiguous, Conv1D weights transposed.

    Missing qkv biases are written as zeros; `lm_head.weight` only when the head is not tied.
    """
    cfg: ModelConfig = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_MAP:
        out[theirs] = sd[ours]
    for i in range(cfg.n_layers):
        for ours, theirs, transpose in _BLOCK_MAP:
            key = f"blocks.{i}.{ours}"
            if key in sd:
                t = sd[key]
            elif ours == "attn.qkv.bias":
                w = sd[f"blocks.{i}.attn.qkv.weight"]
                t = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)  # (3 * emb_dim,)
            else:
                raise KeyError(key)  # pragma: no cover - model.py and this table disagree
            out[f"transformer.h.{i}.{theirs}"] = t.t() if transpose else t  # Conv1D: (in, out)
    if not _is_tied(model):
        out["lm_head.weight"] = sd["out_head.weight"]
    return {k: v.to("cpu").contiguous().clone() for k, v in out.items()}


def _strip_prefix(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF files name the body `transformer.h.0...` (save_pretrained) or `h.0...` (the original GPT-2 upload)."""
    out = {}
    for k, v in hf_sd.items():
        name = k.removeprefix("transformer.")
        parts = name.split(".")  # e.g. ["h", "0", "attn", "masked_bias"]
        if len(parts) == 4 and parts[0] == "h" and ".".join(parts[2:]) in _IGNORED_HF_KEYS:
            continue
        out[name] = v
    return out


def _hf_to_ours(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map a HF GPT-2 state dict to our names for `cfg`; ConfigError for anything that does not fit."""
    sd = _strip_prefix(hf_sd)
    expected = _expected_shapes(cfg)
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []

    def take(hf_name: str, our_name: str, transpose: bool) -> None:
        if hf_name not in sd:
            missing.append(hf_name)
            return
        used.add(hf_name)
        t = sd[hf_name]
        if transpose:
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        want = expected.get(our_name)
        if want is not None and tuple(t.shape) != want:
            mismatched.append(f"{our_name} (HF {hf_name}): checkpoint {tuple(t.shape)} vs config {want}")
        ours[our_name] = t

    for our_name, theirs in _TOP_MAP:
        take(theirs.removeprefix("transformer."), our_name, False)
    for i in range(cfg.n_layers):
        for our_suffix, hf_suffix, transpose in _BLOCK_MAP:
            take(f"h.{i}.{hf_suffix}", f"blocks.{i}.{our_suffix}", transpose)
    extra_layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("h.") and k.split(".")[1].isdigit()
                           and int(k.split(".")[1]) >= cfg.n_layers})
    if extra_layers:
        raise ConfigError(f"--model.n_layers: the checkpoint has {cfg.n_layers + len(extra_layers)} layers, "
                          f"the config {cfg.n_layers}; set --model.n_layers {cfg.n_layers + len(extra_layers)}")
    if missing:
        n_missing_layers = sum(1 for m in missing if m.endswith(".ln_1.weight"))
        hint = f"; set --model.n_layers {cfg.n_layers - n_missing_layers}" if n_missing_layers else ""
        raise ConfigError("the checkpoint lacks " + ", ".join(missing) + hint)
    if mismatched:
        hint = ""
        rows = sd["wte.weight"].shape[0] if "wte.weight" in sd else cfg.vocab_size
        if rows != cfg.vocab_size:  # the rows, not the width (a width differs everywhere)
            hint = f"; set --model.vocab_size {rows} to match the checkpoint"
        raise ConfigError("parameter shapes differ between the checkpoint and the config: "
                          + "; ".join(mismatched) + hint)

    for i in range(cfg.n_layers):
        key = f"blocks.{i}.attn.qkv.bias"
        if not cfg.qkv_bias:
            if torch.count_nonzero(ours[key]) > 0:
                raise ConfigError(f"the checkpoint has non-zero qkv biases (layer {i}); set --model.qkv_bias true")
            del ours[key]

    head = sd.get("lm_head.weight")
    if head is not None:
        used.add("lm_head.weight")
    if cfg.tie_embeddings:
        if head is not None and not torch.equal(head, ours["tok_emb.weight"]):
            raise ConfigError("the checkpoint has an output head (lm_head) separate from the token embedding; "
                              "set --model.tie_embeddings false")
        ours["out_head.weight"] = ours["tok_emb.weight"]
    else:
        if head is None:
            log.info("the checkpoint ties its output head to the token embedding; the untied head starts as a copy")
            head = ours["tok_emb.weight"].clone()
        elif tuple(head.shape) != expected["out_head.weight"]:
            raise ConfigError(f"parameter shapes differ between the checkpoint and the config: out_head.weight "
                              f"(HF lm_head.weight): checkpoint {tuple(head.shape)} vs config "
                              f"{expected['out_head.weight']}")
        ours["out_head.weight"] = head
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ConfigError("the checkpoint has weights gpttrain's GPT cannot use: " + ", ".join(unexpected[:8])
                          + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
    return ours


# ---------------------------------------------------------------------------------------------
# Writing


def refuse_overlap(out: str | Path, source: str | Path | None = None) -> None:
    """An --out that is replaced as a whole (export, consolidate) may not be the current directory or a folder
    holding it, nor a checkpoint, a run dir with checkpoints or a folder of such runs, nor the checkpoint `source`
    being read, a folder holding it or one inside it, nor lie among its run's checkpoints."""
    from gpttrain.checkpoint import is_checkpoint_or_run, step_folders

    o, here = Path(out).resolve(), Path.cwd().resolve()
    if o == here or o in here.parents:
        raise ConfigError(f"--out: {str(out)!r} is the current directory or holds it; it is replaced as a whole, "
                          "so give a new directory")
    if is_checkpoint_or_run(o) or (o.is_dir() and any(step_folders(c) for c in o.iterdir() if c.is_dir())):
        raise ConfigError(f"--out: {out} is a checkpoint or a run dir, or holds runs; --out is replaced as a whole, "
                          "which would delete them: give a new directory")
    if source is not None:
        src = Path(source).resolve()
        if o == src or o in src.parents or src in o.parents:
            raise ConfigError(f"--out: {out} is or holds the checkpoint being read ({src}), or lies inside it; "
                              "--out is replaced as a whole: give a directory outside the run")
        if src.parent.name == "checkpoints" and src.parent in o.parents:
            raise ConfigError(f"--out: {out} lies among the run's checkpoints ({src.parent}); --out is replaced "
                              "as a whole: give a directory outside the run")


def _write_atomically(out_dir: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` and move the result to `out_dir` in one rename; nothing half-written is left."""
    out = Path(out_dir)
    refuse_overlap(out)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out: {str(out)!r} exists and is not a directory; choose another path")
        if any(out.iterdir()) and not overwrite:
            raise ConfigError(f"--out: {str(out)!r} exists and is not empty; choose a new directory or pass "
                              "--overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        default_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "d", out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def export_hf(
    model: nn.Module,
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    tokenizer_spec: dict[str, Any] | None = None,
    tokenizer_json: str | None = None,
) -> Path:
    """Write `out_dir` in the HF GPT-2 layout: `config.json` + `model.safetensors`, atomically.

    `tokenizer_spec` (a tokenizer's `spec()`) sets bos/eos to its end-of-text id and travels in
    config.json under "gpttrain"; `tokenizer_json` (a `bpe` tokenizer's JSON) is written as
    `tokenizer.json`. A non-empty `out_dir` is refused unless `overwrite`.
    """
    _require_hf_compatible(cfg)
    if model.cfg != cfg:
        raise ConfigError(f"export: the model was built with {model.cfg}, not the given config {cfg}")
    _check_tie(model, cfg)
    tensors = to_hf_state_dict(model)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # equal to wte (checked above): HF ties it again
    dtype = model.tok_emb.weight.dtype
    extra = {"gpttrain": {"model": dataclasses.asdict(cfg), "tokenizer": tokenizer_spec}}
    eot = tokenizer_spec.get("eot_id") if tokenizer_spec else None
    config = hf_config(cfg, eot_id=eot, dtype=dtype, extra=extra)

    def write(tmp: Path) -> None:
        _write_json(tmp / "config.json", config)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")

    return _write_atomically(out_dir, overwrite, write)


def export_safetensors(
    model: nn.Module,
    cfg_dict: dict[str, Any],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    tokenizer_spec: dict[str, Any] | None = None,
    tokenizer_payload: str | None = None,
) -> Path:
    """Plain weights under our names (`model.safetensors`) + `config.json` holding `cfg_dict`.

    config.json is {"format": "gpttrain", "format_version": 1, "config": cfg_dict, "tokenizer": spec}.
    A tied output head is stored once (as `tok_emb.weight`); `load_safetensors` ties it again.
    `tokenizer_payload` (what `tokenizer.from_spec` needs besides the spec) goes to `tokenizer.payload`.
    """
    from gpttrain.checkpoint import model_state_for_saving

    _check_tie(model, model.cfg)
    tensors = model_state_for_saving(model)  # a tied head stored once, as in checkpoints
    meta = {"format": "gpttrain", "format_version": 1, "config": cfg_dict, "tokenizer": tokenizer_spec,
            "tied_embeddings": model.cfg.tie_embeddings}
    json.dumps(meta)  # not serializable -> TypeError before anything is written

    def write(tmp: Path) -> None:
        _write_json(tmp / "config.json", meta)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_payload is not None:
            (tmp / "tokenizer.payload").write_text(tokenizer_payload, encoding="utf-8")

    return _write_atomically(out_dir, overwrite, write)


# ---------------------------------------------------------------------------------------------
# Reading


def _read_config(d: Path) -> dict[str, Any]:
    if not d.is_dir():
        raise ConfigError(f"{str(d)!r} is not a directory; give a directory holding config.json and "
                          "model.safetensors")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{str(d)!r} has no config.json; a Hugging Face GPT-2 directory holds config.json and "
                          "model.safetensors")
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also an integer of over 4300 digits
        raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object")
    return hf


def _read_tensors(d: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards a model.safetensors.index.json lists; never a pickle."""
    single = d / "model.safetensors"
    index = d / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard:
                    raise ConfigError(f"{index}: shard name {shard!r} must be a file in {d}")
                out.update(load_file(str(d / shard)))
            return out
    except ConfigError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ConfigError(f"{d}: cannot read the safetensors weights ({type(e).__name__}: {e})") from None
    if (d / "pytorch_model.bin").exists():
        raise ConfigError(f"{str(d)!r} holds pytorch_model.bin but no model.safetensors; gpttrain reads only "
                          "safetensors (a pickle can run code when loaded). Convert it where you trust it, e.g. "
                          "GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise ConfigError(f"{str(d)!r} has no model.safetensors; a Hugging Face GPT-2 directory holds config.json and "
                      "model.safetensors")


def _recorded(hf: dict[str, Any], what: str) -> dict[str, Any] | None:
    """What gpttrain recorded under `what` ("model", "tokenizer") in a config.json it exported; None in another's."""
    section = hf.get("gpttrain")
    value = section.get(what) if isinstance(section, dict) else None
    return value if isinstance(value, dict) else None


def _model_config(hf: dict[str, Any]) -> ModelConfig:
    """The model of a HF GPT-2 `config.json` dict, with the qkv_bias choice gpttrain recorded when it exported the
    directory (GPT-2's own layout always has the biases)."""
    cfg = hf_config_to_model_config(hf)
    return dataclasses.replace(cfg, qkv_bias=False) if (_recorded(hf, "model") or {}).get("qkv_bias") is False else cfg


def init_from_settings(hf_dir: str | Path) -> tuple[ModelConfig, str | None]:
    """What a run started from a HF GPT-2 directory without a preset takes from its config.json (read once): the
    model, and the kind of tokenizer gpttrain recorded there to prepare text with (None for a directory from
    elsewhere). Not a bpe's file: text prepared with it would land in the data dir of the same text's trained bpe
    (named by source, kind and size) and replace it, and the corpus the export was trained on gets the same bpe by
    training it again. On other text a trained bpe differs, and the run refuses it, naming the file to prepare
    with (`check_init_from`)."""
    hf = _read_config(Path(hf_dir))
    kind = (_recorded(hf, "tokenizer") or {}).get("kind")
    return _model_config(hf), kind if kind in ("gpt2", "byte", "bpe") else None


def load_hf(hf_dir: str | Path, cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a HF GPT-2 directory: (ModelConfig, state dict in our names, ready for `load_state_dict`).

    Without `cfg`, the config comes from config.json (with the qkv_bias choice gpttrain recorded
    when it exported the directory). With `cfg`, the weights are checked against it instead:
    every parameter whose shape differs is named.
    """
    d = Path(hf_dir)
    from_file = _model_config(_read_config(d))
    if cfg is None:
        cfg = from_file
    else:
        if from_file.n_heads != cfg.n_heads and cfg.emb_dim == from_file.emb_dim:
            raise ConfigError(f"--model.n_heads: the checkpoint has {from_file.n_heads} heads, the config "
                              f"{cfg.n_heads}; set --model.n_heads {from_file.n_heads}")
    tensors = _read_tensors(d)
    try:
        return cfg, _hf_to_ours(tensors, cfg)
    except ConfigError as e:
        # The hints above come one at a time; config.json has the whole geometry: said at once.
        differ = [k for k in ("n_layers", "emb_dim", "n_heads", "context_length", "vocab_size")
                  if getattr(from_file, k) != getattr(cfg, k)]
        if not differ:
            raise
        what = str(e).split("; set --model.")[0]  # its one hint, replaced by the whole geometry's
        raise ConfigError(f"{d}'s config.json gives " + ", ".join(f"{k} {getattr(from_file, k)}" for k in differ)
                          + ": set " + " ".join(f"--model.{k} {getattr(from_file, k)}" for k in differ)
                          + f", or leave out --preset and --config to take its model as it is ({what})") from None


def check_init_from(hf_dir: str | Path, tokenizer_spec: dict[str, Any] | None = None) -> None:
    """What `--init-from` can be refused for before any data is prepared or model built: not a directory, a
    gpttrain run, checkpoint or `--format safetensors` export (each said with what to do), no config.json. With
    `tokenizer_spec` (the data's), a directory gpttrain exported with another tokenizer is refused: its
    embeddings' rows would stand for other tokens. Messages name --init-from."""
    from gpttrain.checkpoint import is_checkpoint_or_run

    d = Path(hf_dir)
    try:
        if d.is_dir() and is_checkpoint_or_run(d):
            raise ConfigError(f"{d} is a gpttrain run or checkpoint, not a model directory; continue it with "
                              f"--resume, or start from its weights: gpttrain export {d} --out DIR, then "
                              "--init-from DIR")
        hf = _read_config(d)
        if hf.get("format") == "gpttrain":
            raise ConfigError(f"{d} is a --format safetensors export; --init-from reads the Hugging Face layout: "
                              "export the run again with --format hf")
        recorded = _recorded(hf, "tokenizer")
        if tokenizer_spec is not None and recorded is not None:
            from gpttrain.tokenizer import spec_differences

            differ = spec_differences(recorded, tokenizer_spec)
            if differ:
                kind = recorded.get("kind")
                its = (f"--tokenizer bpe --tokenizer-file {d / 'tokenizer.json'}" if kind == "bpe"
                       else f"--tokenizer {kind}")
                raise ConfigError(f"{d} was trained with another tokenizer than the data's ("
                                  + "; ".join(f"{k} {was!r} vs the data's {now!r}" for k, was, now in differ)
                                  + f"); its embeddings would stand for other tokens: prepare the text with its "
                                  f"tokenizer (gpttrain prepare ... {its})")
    except ConfigError as e:
        raise ConfigError(f"--init-from: {e}") from None


@torch.no_grad()
def init_from_hf(model: nn.Module, hf_dir: str | Path) -> nn.Module:
    """Load the weights of a HF GPT-2 directory into `model` (shapes checked against `model.cfg`)."""
    _, sd = load_hf(hf_dir, model.cfg)  # a tied config gets out_head.weight = tok_emb.weight there
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        # FSDP2: each rank read the full tensors; each keeps its own shard of them.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # set_model_state_dict fills a missing key with the model's own value before its strict load.
        missing = sorted(set(model.state_dict()) - set(sd))
        if missing:
            raise ConfigError(f"{hf_dir}: no weights for {', '.join(missing[:5])}; it does not hold this model")
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        model.load_state_dict(sd, strict=True)
    return model


def load_safetensors(src_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read what `export_safetensors` wrote: (config dict, state dict in our names, tokenizer spec)."""
    d = Path(src_dir)
    meta = _read_config(d)
    if meta.get("format") != "gpttrain":
        raise ConfigError(f"{d / 'config.json'}: not a gpttrain export (format {meta.get('format')!r})")
    sd = _read_tensors(d)
    if meta.get("tied_embeddings") and "out_head.weight" not in sd:
        sd["out_head.weight"] = sd["tok_emb.weight"]
    return meta.get("config", {}), sd, meta.get("tokenizer")
