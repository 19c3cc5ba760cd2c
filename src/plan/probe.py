"""The CPU runtime-baseline probe, run by `seqpar.plan.baseline` in a fresh interpreter:

    python -c "from seqpar.plan.probe import _rank_baseline_probe; _rank_baseline_probe()"

Its imports are the measurement: everything a training process imports before its ranks start (with its text's
token ids cached, not `datasets`; of transformers, the tokenizer and the config classes it saves with). Only the
probe's own process imports this module; importing it anywhere else would load the whole training stack for
nothing.
"""

from __future__ import annotations

import os

import hydra  # noqa: F401
import torch
from transformers import BertConfig, GenerationConfig, GPT2Config, PreTrainedTokenizerFast  # noqa: F401

import seqpar.cli  # noqa: F401
import seqpar.data  # noqa: F401
import seqpar.trainer.loop  # noqa: F401


def _status_mib(*fields: str) -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f) if k in fields}


def _small_step() -> None:
    """One tiny training step, which touches the kernels' code."""
    torch.set_num_threads(1)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    layer(torch.randn(2, 16, 64)).sum().backward()
    torch.optim.AdamW(layer.parameters()).step()


def _rank_baseline_probe() -> None:
    """Print the resident memory (MiB) of a CPU rank before it holds tensors of its own, forked and as a process of
    its own: ranks are forked from a process with the training stack imported, so a rank holds that process's
    anonymous memory at once and the library code it touches as it runs (file-backed pages count towards a forked
    process only once touched)."""
    read, write = os.pipe()
    if os.fork() == 0:  # a forked rank
        anon = _status_mib("RssAnon")["RssAnon"]
        _small_step()
        os.write(write, f"{anon + _status_mib('RssFile')['RssFile']}".encode())
        os._exit(0)
    os.close(write)
    forked = os.read(read, 64).decode()
    _small_step()  # a rank that is a process of its own (one process, or one that torchrun or srun started)
    status = _status_mib("RssAnon", "RssFile")
    print(forked, status["RssAnon"] + status["RssFile"])
