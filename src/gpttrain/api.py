"""The Python API (`gpttrain.load`, `gpttrain.generate`) and the `generate` / `export` commands.

Everything starts from a checkpoint alone: the resolved config and the tokenizer travel inside it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from gpttrain.config import MAX_SEED, Config, from_dict
from gpttrain.errors import ConfigError

log = logging.getLogger("gpttrain")

DTYPES = ("fp32", "bf16")  # --dtype choices; torch is imported only where they become torch dtypes


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


@dataclass
class Loaded:
    """A trained model ready to use: `model` (eval mode), `tokenizer`, resolved `config`, `checkpoint` path, and the
    training `step` it was saved at (None where the checkpoint does not say)."""

    model: Any
    tokenizer: Any
    config: Config
    checkpoint: Path
    step: int | None = None

    def generate(self, prompt: str, max_new_tokens: int = 100, **kw) -> str:
        return generate(self, prompt, max_new_tokens, **kw)


def load(path: str | Path, *, device: str = "auto", dtype: str = "fp32") -> Loaded:
    """Load a checkpoint folder, or a run dir's newest complete checkpoint, for inference."""
    from gpttrain import checkpoint as ckpt
    from gpttrain.distributed import resolve_device
    from gpttrain.model import build_model

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not allowed; use one of {', '.join(DTYPES)}")
    path, state = ckpt.open_checkpoint(path, skip=("optimizer.pt",))  # inference reads no optimizer state
    cfg = from_dict(state["config"])
    dev = resolve_device(device, flag=False)
    model = build_model(cfg.model, dev, init=False)  # every weight comes from the checkpoint
    ckpt.load_full_model(model, path, state)  # one file, or the shards of an FSDP run
    model.to(_torch_dtype(dtype)).eval()
    tokenizer = ckpt.load_tokenizer(path, state)
    if tokenizer is None:
        raise ConfigError(f"checkpoint {path} carries no tokenizer; it cannot turn text into tokens")
    step = (state.get("trainer") or {}).get("step")
    return Loaded(model, tokenizer, cfg, path, int(step) if isinstance(step, int) else None)


def generate(model_or_loaded, prompt: str, max_new_tokens: int = 100, *, tokenizer=None, temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = 0.95, seed: int | None = None, num_samples: int = 1,
             stream=None) -> str | list[str]:
    """Continue `prompt`. Returns the new text (a list when num_samples > 1); `stream(piece)` gets it live.

    `num_samples` are drawn as one batch from `seed`: the same seed gives the same list. `gpttrain generate
    --num-samples N --seed S` runs sample i alone with seed S + i instead, so its samples are not these."""
    from gpttrain.sampling import generate_text

    if not isinstance(prompt, str):
        raise TypeError(f"generate: prompt must be text (a str), not {type(prompt).__name__}"
                        + ("; decode it first, e.g. prompt.decode('utf-8')" if isinstance(prompt, bytes) else ""))
    if isinstance(model_or_loaded, (str, PathLike)):
        raise ConfigError(f"generate: {str(model_or_loaded)!r} is a path, not a model: load it first, "
                          f"gpttrain.generate(gpttrain.load({str(model_or_loaded)!r}), prompt)")
    if isinstance(model_or_loaded, Loaded):
        model, tokenizer = model_or_loaded.model, tokenizer or model_or_loaded.tokenizer
    else:
        model = model_or_loaded
    if tokenizer is None:
        raise ConfigError("generate: pass tokenizer= with a bare model (or the result of gpttrain.load)")
    texts = generate_text(model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, num_samples=num_samples, stream=stream)
    return texts[0] if num_samples == 1 else texts


# ---- commands ----------------------------------------------------------------------------------


def add_generate_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR|PATH",
                   help="a run dir (its newest complete checkpoint) or a checkpoint folder")
    p.add_argument("--prompt", default=None, help="the text to continue; '-' reads stdin (default: end-of-text, "
                                                  "i.e. a fresh document)")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from a file")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default: 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: off)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1] (default: 0.95)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible (default: random)")
    p.add_argument("--num-samples", type=int, default=1, help="independent continuations (default: 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="(default: auto)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="(default: fp32)")
    p.add_argument("--no-stream", action="store_true", help="print each sample when done instead of streaming")


def _read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise ConfigError("--prompt and --prompt-file: give one of them, not both")
    if args.prompt_file is not None:
        p = Path(args.prompt_file)
        if p.is_dir():
            raise ConfigError(f"--prompt-file: {str(p)!r} is a directory; give a text file")
        if not p.is_file():
            raise ConfigError(f"--prompt-file: {str(p)!r} does not exist")
        return _utf8(p.read_bytes(), f"--prompt-file: {p}")
    if args.prompt == "-":
        if not hasattr(sys.stdin, "buffer"):  # a text stream put in its place (tests, embedding)
            return sys.stdin.read()
        return _utf8(sys.stdin.buffer.read(), "--prompt - (standard input)")
    return args.prompt or ""


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8, e.g. "
                          "iconv -f latin1 -t utf-8") from None


def run_generate(args, out=None) -> int:
    from gpttrain.sampling import check_sampling_args

    out = out if out is not None else sys.stdout  # looked up now: a default bound at import keeps a stale stream

    check_sampling_args(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, num_samples=args.num_samples, seed=args.seed, flags=True)
    if args.seed is not None and args.seed + args.num_samples - 1 > MAX_SEED:
        raise ConfigError(f"--seed: {args.seed} must be at most {MAX_SEED - args.num_samples + 1} with "
                          f"--num-samples {args.num_samples} (sample i uses seed + i)")
    prompt = _read_prompt(args)
    from gpttrain.distributed import resolve_device

    device = str(resolve_device(args.device))  # refused as the command's --device, not as load's device=
    loaded = load(args.checkpoint, device=device, dtype=args.dtype)
    log.info("loaded %s (%s parameters%s)", loaded.checkpoint, f"{loaded.model.num_params():,}",
             "" if loaded.step is None else f", step {loaded.step}")
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        if args.num_samples > 1:
            out.write(f"--- sample {i + 1}\n")
        out.write(prompt)
        out.flush()

        def emit(piece: str) -> None:
            out.write(piece)
            out.flush()

        text = generate(loaded, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=seed, stream=None if args.no_stream else emit)
        if args.no_stream:
            out.write(text)
        out.write("\n")
        out.flush()
    return 0


def add_export_arguments(p) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run dir (newest complete checkpoint) or a checkpoint")
    p.add_argument("--format", default="hf", choices=["hf", "safetensors"],
                   help="hf: Hugging Face GPT-2 layout (config.json + model.safetensors) that "
                        "transformers.GPT2LMHeadModel loads; safetensors: plain weights + our config (default: hf)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run_export(args) -> int:
    from gpttrain import checkpoint as ckpt
    from gpttrain.export import export_hf, export_safetensors, refuse_overlap
    from gpttrain.tokenizer import payload_of

    refuse_overlap(args.out, ckpt.resolve_checkpoint(args.checkpoint))
    loaded = load(args.checkpoint, device="cpu")
    path = loaded.checkpoint
    tok = loaded.tokenizer
    if args.format == "hf":
        out = export_hf(loaded.model, loaded.config.model, args.out, overwrite=args.overwrite,
                        tokenizer_spec=tok.spec(), tokenizer_json=tok.payload() if tok.kind == "bpe" else None)
    else:
        out = export_safetensors(loaded.model, loaded.config.to_dict(), args.out, overwrite=args.overwrite,
                                 tokenizer_spec=tok.spec(), tokenizer_payload=payload_of(tok))
    log.info("exported %s (%s parameters, %s) to %s", path, f"{loaded.model.num_params():,}",
             "the Hugging Face GPT-2 layout" if args.format == "hf" else "gpttrain's safetensors", out)
    return 0
