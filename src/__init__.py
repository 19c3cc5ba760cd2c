"""seqpar: BERT and GPT training for very long sequences with Ring Self-Attention sequence parallelism."""

__version__ = "0.1.0"
