"""Blended prepared datasets (`data.sources`): every global batch draws from the sources in their weights'
proportions, deterministically from the seed, and resumes where it stopped."""

from __future__ import annotations

import numpy as np
import pytest

from seqpar.config import Config, DataConfig, ModelConfig, SourceConfig, TrainerConfig
from seqpar.data.loader import GlobalBatchLoader
from seqpar.data.prepared.blend import BlendedSequences, blend_schedule
from seqpar.data.sequences import build_sequences
from seqpar.errors import UserError

from .test_prepared import config, corpus, prepare_dataset, prepared  # noqa: F401 - the shared corpus and prepared fixtures


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.25, 0.25], [0.9, 0.05, 0.05], [1 / 3, 2 / 3]])
def test_every_prefix_of_the_schedule_holds_each_source_within_one_of_its_share(weights):
    source, rank = blend_schedule(np.asarray(weights), 5000)
    counts = np.zeros(len(weights))
    for i, s in enumerate(source):
        counts[s] += 1
        assert (np.abs(counts - np.asarray(weights) * (i + 1)) <= 1.0 + 1e-9).all(), (i, counts)
    for s in range(len(weights)):  # each source's sequences are taken in order: 0, 1, 2, ...
        assert (rank[source == s] == np.arange((source == s).sum())).all()


class Tagged:
    """A stand-in dataset whose sequences say where they came from."""

    def __init__(self, tag: int, n: int):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def get(self, index, epoch=0):
        return {"input_ids": np.array([self.tag, index, epoch])}


def test_each_global_batch_draws_in_proportion_and_resumes():
    blend = BlendedSequences([Tagged(0, 300), Tagged(1, 40)], [0.75, 0.25], ["a", "b"], seed=5)
    loader = GlobalBatchLoader(blend, 8, seed=5)
    batches = [next(loader)["input_ids"].numpy() for _ in range(loader.steps_per_epoch + 2)]
    for b in batches:
        assert (b[:, 0] == 0).sum() == 6 and (b[:, 0] == 1).sum() == 2
    seen_b = np.concatenate([b[b[:, 0] == 1, 1] for b in batches[: loader.steps_per_epoch]])
    assert sorted(seen_b[:40]) == list(range(40))  # the small source is read whole, then again (upsampled)
    assert blend.sequences_by_source(1, 16) == {"a": 255 + 12, "b": 85 + 4}
    again = GlobalBatchLoader(BlendedSequences([Tagged(0, 300), Tagged(1, 40)], [0.75, 0.25], ["a", "b"], seed=5), 8, seed=5)
    again.load_state_dict({**loader.state_dict(), "epoch": 0, "step": 3})
    assert (next(again)["input_ids"].numpy() == batches[3]).all()
    other = BlendedSequences([Tagged(0, 300), Tagged(1, 40)], [0.75, 0.25], ["a", "b"], seed=6)
    assert not (next(GlobalBatchLoader(other, 8, seed=6))["input_ids"].numpy() == batches[0]).all()


def test_prepared_sources_blend_when_they_share_a_tokenizer(prepared, corpus, tmp_path):  # noqa: F811
    other = tmp_path / "other"
    prepare_dataset(config(corpus[:4], tokenizer=str(prepared["gpt"] / "tokenizer")), other)
    cfg = Config(model=ModelConfig(vocab_size=512, max_seq_len=64), trainer=TrainerConfig(global_batch_size=4),
                 data=DataConfig(source="prepared", seq_len=64, sources=[SourceConfig(str(prepared["gpt"]), 0.5),
                                                                       SourceConfig(str(other), 0.5)]))
    data = build_sequences(cfg)
    assert len(data.train) == len(build_sequences(_one(prepared["gpt"])).train) + len(build_sequences(_one(other)).train)
    assert data.train.names == ["data", "other"] and data.dataset_id
    retrained = tmp_path / "retrained"
    prepare_dataset(config(corpus[:4]), retrained)  # its own trained tokenizer
    cfg.data.sources[1].path = str(retrained)
    with pytest.raises(UserError, match="data.sources were prepared with different tokenizers"):
        build_sequences(cfg)


def _one(path) -> Config:
    return Config(model=ModelConfig(vocab_size=512, max_seq_len=64), trainer=TrainerConfig(global_batch_size=4),
                  data=DataConfig(source="prepared", path=str(path), seq_len=64))
