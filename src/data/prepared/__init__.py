"""Prepared datasets: a corpus tokenized once into memory-mapped shards (`seqpar.prepare`), read in place by training.

- `format`: the on-disk layout (token files, document indexes, manifest) and reading it back, checked;
- `sources`: the documents of each text source, streamed, and a fingerprint of the source;
- `encode`: the tokenizer (trained on a bounded sample, or the user's) and tokenization over several processes;
- `writer`: writing shards as tokens come, resuming an interrupted prepare, the manifest written last;
- `windows`: training sequences (GPT windows, BERT packing) read from a prepared dataset.

docs/data.md documents the format.
"""
