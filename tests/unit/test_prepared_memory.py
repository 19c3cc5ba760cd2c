"""Reading a prepared corpus needs memory for the batches, not for the corpus: iterating a corpus ten times larger
takes no more anonymous (non file-backed) memory, since the tokens stay in the memory-mapped files; and opening it
as a rank does adds no more to the resident high-water mark (what `peak_mem_mib` reports on CPU, mapped file pages
included) for ten times the documents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seqpar.config import Config, DataConfig, ModelConfig
from seqpar.data.prepared.writer import prepare_dataset

from ..conftest import ROOT

WORDS = 1000

# Opens the prepared corpus as training does and takes every global batch of an epoch, sampling the process's
# anonymous resident memory (RssAnon: page-cache pages of the mapped files are not counted, they are reclaimable).
ITERATE = """
import json, sys
from seqpar.config import Config, DataConfig, ModelConfig, TrainerConfig
from seqpar.data.loader import GlobalBatchLoader
from seqpar.data.sequences import build_sequences

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

cfg = Config(model=ModelConfig(arch=sys.argv[2], vocab_size=1024, max_seq_len=64),
             data=DataConfig(source="prepared", path=sys.argv[1], seq_len=64), trainer=TrainerConfig(global_batch_size=8))
import transformers, torch  # imported before the baseline, as in training
base = anon_kib()
data = build_sequences(cfg)
loader = GlobalBatchLoader(data.train, 8, seed=1)
peak, tokens = 0, 0
for _ in range(loader.steps_per_epoch):
    tokens += int(next(loader)["input_ids"].numel())
    peak = max(peak, anon_kib())
print(json.dumps({"growth_kib": peak - base, "tokens": tokens, "windows": len(data.train)}))
"""


# Opens the prepared corpus as a rank does and takes a few batches, with the resident high-water mark restarted after
# the imports: its growth is what the trainer's peak_mem_mib adds for the data (VmHWM: mapped file pages count).
OPEN = """
import json, sys
from seqpar.config import Config, DataConfig, ModelConfig, TrainerConfig
from seqpar.data.loader import GlobalBatchLoader
from seqpar.data.sequences import build_sequences

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

cfg = Config(model=ModelConfig(arch=sys.argv[2], vocab_size=1024, max_seq_len=64),
             data=DataConfig(source="prepared", path=sys.argv[1], seq_len=32), trainer=TrainerConfig(global_batch_size=8))
import transformers, torch  # imported before the baseline, as in training
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM restarts from VmRSS, as the trainer's reset_peak_mem does
base = kib("VmRSS")
data = build_sequences(cfg)
loader = GlobalBatchLoader(data.train, 8, seed=1)
for _ in range(4):
    next(loader)
print(json.dumps({"growth_kib": kib("VmHWM") - base, "windows": len(data.train)}))
"""


def word_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<|endoftext|>", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"] + [f"w{i}" for i in range(WORDS)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]").save_pretrained(path)


def corpus(path: Path, paragraphs: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(paragraphs):
            f.write(" ".join(f"w{i}" for i in rng.integers(0, WORDS, size=int(rng.integers(20, 400)))) + "\n\n")


def _prepare_and_measure(tmp_path, name: str, arch: str, script: str, **data) -> dict:
    """Prepare `<name>.txt` with the word tokenizer, then run `script` on it in a fresh process; its last JSON line."""
    cfg = Config(model=ModelConfig(arch=arch, vocab_size=1024, max_seq_len=64),
                 data=DataConfig(source="text_files", paths=[str(tmp_path / f"{name}.txt")], num_proc=1,
                                 tokenizer=str(tmp_path / "tok"), **data))
    prepare_dataset(cfg, tmp_path / name)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / name), arch], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_iterating_a_ten_times_larger_corpus_takes_no_more_memory(tmp_path, arch):
    word_tokenizer(tmp_path / "tok")
    growth = {}
    for name, paragraphs in (("small", 1_000), ("large", 10_000)):
        corpus(tmp_path / f"{name}.txt", paragraphs)
        growth[name] = _prepare_and_measure(tmp_path, name, arch, ITERATE, seq_len=64)
    small, large = growth["small"], growth["large"]
    assert large["tokens"] > 9 * small["tokens"]  # every window was read: ~2M tokens, 8 MB as int32 in memory
    assert large["growth_kib"] < small["growth_kib"] + 3 * 1024, growth


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_opening_a_corpus_of_ten_times_the_documents_adds_nothing_to_the_high_water_mark(tmp_path, arch):
    """Many short documents: the document index (8 bytes a document) and the windows (the loader's permutation,
    BERT's window lengths) are what could grow with the corpus. 600K documents: a 4.8 MB index, ~50K windows of 32 tokens."""
    word_tokenizer(tmp_path / "tok")
    rng = np.random.default_rng(0)
    growth = {}
    for name, lines in (("small", 60_000), ("large", 600_000)):
        words = rng.integers(0, WORDS, size=(lines, 2))
        (tmp_path / f"{name}.txt").write_text("".join(f"w{a} w{b}\n" for a, b in words))
        growth[name] = _prepare_and_measure(tmp_path, name, arch, OPEN, seq_len=32, sample_by="line")
    small, large = growth["small"], growth["large"]
    assert large["windows"] > 9 * small["windows"]
    assert large["growth_kib"] < small["growth_kib"] + 2 * 1024, growth
