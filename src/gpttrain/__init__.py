"""gpttrain: train GPT-style language models from scratch, from one CPU to many GPUs."""

__version__ = "0.1.0"


def load(path, *, device: str = "auto", dtype: str = "fp32"):
    """Load a checkpoint (or a run dir's newest) for inference: `.model`, `.tokenizer`, `.config`."""
    from gpttrain.api import load as _load

    return _load(path, device=device, dtype=dtype)


def generate(model_or_loaded, prompt: str, max_new_tokens: int = 100, **kwargs):
    """Continue `prompt` with a loaded model; see `gpttrain.api.generate` for the sampling options."""
    from gpttrain.api import generate as _generate

    return _generate(model_or_loaded, prompt, max_new_tokens, **kwargs)
