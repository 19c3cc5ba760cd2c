"""Llama (and Qwen2): the model and its parallel layout (`model.py`), transformers interop (`hf.py`)."""

from seqpar.models.llama.model import Llama

__all__ = ["Llama"]
