"""The data of a run, whatever its source: `build_data(cfg)` (prepared, raw text through the cache, or a stream),
and `BuiltSequences`, which keeps the last one for the next job of a multirun."""

from __future__ import annotations

import dataclasses
import json
import os

from seqpar.config import Config, data_view
from seqpar.data.sequences import SequenceData, build_sequences
from seqpar.data.streaming import build_streaming


def build_data(cfg: Config) -> SequenceData:
    """Streamed (`data.streaming`) or read from a prepared dataset (`seqpar.data.sequences.build_sequences`). The
    data code sees the model as the kind of data it trains on (`config.data_view`: Llama reads GPT's)."""
    cfg = data_view(cfg)
    return build_streaming(cfg) if cfg.data.streaming else build_sequences(cfg)


class BuiltSequences:
    """The sequences built last and the settings they were built for: the jobs of a Hydra multirun run one after
    another in one process and usually read the same sequences, so each reuses the previous job's."""

    def __init__(self):
        self.key: str | None = None
        self.data: SequenceData | None = None

    def get(self, cfg: Config) -> SequenceData:
        """`build_data(cfg)`, or the data built last when it was built for the same settings."""
        key = json.dumps([dataclasses.asdict(cfg.data), cfg.model.arch, cfg.model.vocab_size, cfg.trainer.seed,
                          cfg.trainer.global_batch_size, cfg.trainer.eval_batches, os.environ.get("SEQPAR_CACHE")],
                         sort_keys=True)
        if self.data is None or self.key != key:
            self.key, self.data = key, build_data(cfg)
        return self.data
