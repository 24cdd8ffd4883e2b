"""gpttrain: train GPT-style language models from scratch, from one CPU to many GPUs."""

__version__ = "0.1.0"
