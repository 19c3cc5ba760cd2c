"""GPT (the GPT-2 architecture): the model and its parallel layout (`model.py`), transformers interop (`hf.py`)."""

from seqpar.models.gpt.model import GPT

__all__ = ["GPT"]
