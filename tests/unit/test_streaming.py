"""Streaming (`data=hf_dataset data.streaming=true`) on a local dataset: the windows are those a prepared dataset
of the same documents makes, each dp rank reads its own part of the stream, and a saved position resumes."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from seqpar.config import Config, DataConfig, ModelConfig, TrainerConfig
from seqpar.data.build import build_data
from seqpar.data.prepared.writer import prepare_dataset
from seqpar.data.sequences import build_sequences
from seqpar.data.streaming import StreamingLoader
from seqpar.errors import UserError

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    """A local `datasets` directory of two JSON-lines shards: the paragraphs of some standard-library sources."""
    root = tmp_path_factory.mktemp("hub")
    for shard, names in enumerate([("textwrap.py", "string.py", "shlex.py"), ("calendar.py", "heapq.py", "glob.py")]):
        paragraphs = [p for n in names for p in (STDLIB / n).read_text().split("\n\n") if p.strip()]
        (root / f"train-{shard}.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    return root


def cfg_for(hub_dir: Path, arch: str, **data) -> Config:
    return Config(model=ModelConfig(arch=arch, vocab_size=512, max_seq_len=64),
                  data=DataConfig(source="hf_dataset", hf_name=str(hub_dir), seq_len=64, val_fraction=0.1, num_proc=1,
                                  **data),
                  trainer=TrainerConfig(global_batch_size=4, eval_batches=2, seed=3))


@pytest.fixture(scope="module", params=["gpt", "bert"])
def prepared_and_streamed(request, hub_dir, tmp_path_factory):
    arch = request.param
    out = tmp_path_factory.mktemp(f"prepared-{arch}") / "data"
    prepare_dataset(cfg_for(hub_dir, arch), out)
    cfg = cfg_for(hub_dir, arch, streaming=True, tokenizer=str(out / "tokenizer"))
    prepared = build_sequences(Config(model=cfg.model, trainer=cfg.trainer,
                                      data=DataConfig(source="prepared", path=str(out), seq_len=64)))
    return cfg, prepared, build_data(cfg)


def test_streamed_windows_are_the_prepared_windows_in_order(prepared_and_streamed):
    cfg, prepared, streamed = prepared_and_streamed
    loader = StreamingLoader(cfg, streamed.tokenizer, 4, seed=3)
    for step in range(6):
        batch = next(loader)
        for slot in range(4):
            expected = prepared.train.get(step * 4 + slot, 0)
            assert all((batch[k][slot].numpy() == expected[k]).all() for k in expected), (step, slot)
    assert len(streamed.val) == min(len(prepared.val), 8)  # eval_batches x global batch
    assert all((streamed.val.get(i)["input_ids"] == prepared.val.get(i)["input_ids"]).all() for i in range(len(streamed.val)))


def test_a_saved_position_resumes_the_same_sequences(prepared_and_streamed):
    cfg, _, streamed = prepared_and_streamed
    loaders = [StreamingLoader(cfg, streamed.tokenizer, 4, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for _ in range(5):
        firsts = [next(loader) for loader in loaders]
    assert not np.array_equal(firsts[0]["input_ids"], firsts[1]["input_ids"])  # each rank its own part

    def gather(value):  # both ranks' values, in the order the loader asks (document, offset, dp rank)
        return gathered.pop(0)

    gathered = [[float(loaders[0].position[0]), float(loaders[1].position[0])],
                [float(loaders[0].position[1]), float(loaders[1].position[1])], [0.0, 1.0]]
    loaders[0].gather_positions(gather)
    state = json.loads(json.dumps(loaders[0].state_dict()))  # as meta.json keeps it
    assert state["streaming"]["positions"] == [list(loaders[0].position), list(loaders[1].position)]
    for rank in range(2):
        resumed = StreamingLoader(cfg, streamed.tokenizer, 4, dp_rank=rank, dp_size=2, seed=3)
        resumed.load_state_dict(state)
        for _ in range(3):
            a, b = next(loaders[rank]), next(resumed)
            assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="stream positions of parallel.dp=2, this run has parallel.dp=1"):
        StreamingLoader(cfg, streamed.tokenizer, 4, seed=3).load_state_dict(state)
