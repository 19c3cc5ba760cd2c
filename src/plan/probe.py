"""The CPU runtime-baseline probe, run by `seqpar.plan.baseline` in a fresh interpreter:

    python -c "from seqpar.plan.probe import _rank_baseline_probe; _rank_baseline_probe('seqpar')"

Its imports are the measurement: everything a training process imports before its ranks start (with its text's
token ids cached, not `datasets`; of transformers, the tokenizer and the config classes it saves with). Only the
probe's own process imports this module; importing it anywhere else would load the whole training stack for
nothing.

With `trainer.engine=deepspeed` a rank also holds DeepSpeed: the job imports it before the ranks start
(`seqpar.trainer.job`), and `deepspeed.initialize` loads more on its first call in each rank (its communication
module and config classes, and the modules its check of the optimizer imports, Muon's among them). The probe
runs that call on a one-parameter model in a one-rank gloo group, so what it adds is DeepSpeed's code and
bookkeeping, not tensors the planner counts elsewhere.
"""

from __future__ import annotations

import os

import hydra  # noqa: F401
import torch
import torch.distributed as dist
from transformers import BertConfig, GenerationConfig, GPT2Config, PreTrainedTokenizerFast  # noqa: F401

import seqpar.cli  # noqa: F401
import seqpar.data  # noqa: F401
import seqpar.trainer.loop  # noqa: F401
from seqpar.trainer.engine import import_deepspeed


def _status_mib(*fields: str) -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f) if k in fields}


def _small_step() -> None:
    """One tiny training step, which touches the kernels' code."""
    torch.set_num_threads(1)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    layer(torch.randn(2, 16, 64)).sum().backward()
    torch.optim.AdamW(layer.parameters()).step()


def _deepspeed_start() -> None:
    """`deepspeed.initialize` as a rank of ours calls it (ZeRO-1, torch's AdamW), on a one-parameter model in a
    one-rank gloo group: what DeepSpeed loads and keeps besides the tensors of the model and optimizer."""
    deepspeed = import_deepspeed()
    if not dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what our launcher sets in a rank
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = torch.nn.Linear(1, 1, bias=False)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config,
                                      dist_init_required=False)
    engine.backward(engine(torch.ones(1, 1)).sum())
    engine.step()


def _rank_baseline_probe(engine: str = "seqpar") -> None:
    """Print the resident memory (MiB) of a CPU rank before it holds tensors of its own, forked and as a process of
    its own: ranks are forked from a process with the training stack imported, so a rank holds that process's
    anonymous memory at once and the library code it touches as it runs (file-backed pages count towards a forked
    process only once touched). `engine="deepspeed"`: DeepSpeed imported before the fork, started in the rank."""
    if engine == "deepspeed":
        import_deepspeed()
    read, write = os.pipe()
    if os.fork() == 0:  # a forked rank
        anon = _status_mib("RssAnon")["RssAnon"]
        _small_step()
        if engine == "deepspeed":  # its modules and bookkeeping are anonymous memory made in the rank: all of it
            before = _status_mib("RssAnon")["RssAnon"]
            _deepspeed_start()
            anon += _status_mib("RssAnon")["RssAnon"] - before
        os.write(write, f"{anon + _status_mib('RssFile')['RssFile']}".encode())
        os._exit(0)
    os.close(write)
    forked = os.read(read, 64).decode()
    _small_step()  # a rank that is a process of its own (one process, or one that torchrun or srun started)
    if engine == "deepspeed":
        _deepspeed_start()
    status = _status_mib("RssAnon", "RssFile")
    print(forked, status["RssAnon"] + status["RssFile"])
