"""BERT: the model and its parallel layout (`model.py`), transformers interop (`hf.py`)."""

from seqpar.models.bert.model import BERT

__all__ = ["BERT"]
