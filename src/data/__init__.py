"""Data: the built-in corpus and other text sources, tokenizers, sequence packing, MLM masking and the loader."""
