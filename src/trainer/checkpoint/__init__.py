"""Distributed checkpoints: everything a run needs to continue exactly, in any layout.

A checkpoint is a directory `<checkpoint.dir>/step_00000042/` holding

- the tensors, written by `torch.distributed.checkpoint` (DCP) with every rank saving its own shards in parallel:
  `model.<name>` (each parameter and buffer as the rank holds it: a tensor-parallel DTensor shard, this pipeline
  stage's layers), `optim.<name>.{exp_avg,exp_avg_sq,step}` (AdamW's state, keyed by parameter name so that it
  reshards like the parameter) and `rng.rank<r>.{cpu,cuda}` (each rank's generator state);
- `meta.json`, written last by rank 0: the step, the model architecture, the layout, the data settings (and the
  tokenizer's vocabulary checksum and training-set size they made), the data loader's position, the learning-rate
  schedule's state, the skipped-step counters, and the size and CRC-32 of every file;
- `tokenizer/`, so that `python -m seqpar.export` makes a complete transformers directory.

Under `trainer.engine=deepspeed` the model and optimizer are saved by DeepSpeed itself into `deepspeed/` (ZeRO's
files, one optimizer partition per data-parallel rank); DCP then holds only the RNG states, and meta.json the
rest as above. Such a checkpoint resumes with the same engine, ZeRO stage and layout.

Names are global (a pipeline stage's layers keep their index; the tied head keeps its own name), so DCP can load a
checkpoint into another dp x pp x tp x sp layout: it reads each rank's slice of every tensor from whichever files
hold it. The RNG states are restored only into the same layout (they describe each rank's own dropout stream).

Loading never unpickles arbitrary objects: tensors are read with `torch.load(weights_only=True)` by DCP, DCP's
`.metadata` index is read by an unpickler that only accepts DCP's own metadata classes and torch's dtypes and
sizes, and DeepSpeed's files (only where meta.json names that engine) weights-only with DeepSpeed's few classes
allowed.

One job per module:

- `paths`: where checkpoints are (step directory names, the checkpoint directory, the published checkpoints),
  pruning the oldest and moving a replaced history aside;
- `ranks`: what the ranks do together (gather, barrier, a failure as one line, DCP in one process);
- `files`: reading a checkpoint's files safely (the restricted index unpickler, meta.json with file sizes,
  CRC-32 checks, DeepSpeed's files weights-only);
- `compat`: whether a checkpoint fits this run (architecture, batch, data, engine) and what meta.json records of it;
- `resume`: which checkpoint a run continues from (`find_resume` -> `ResumePoint`, once per job; the ranks'
  `confirm`, which passes over damaged ones under `auto`);
- `state`: the stateful objects a checkpoint holds (model, optimizer, schedule, RNG, the run's counters);
- `manager`: `CheckpointManager`, which saves (the agreed phases, atomic publish) and loads those states;
- `model_weights`: a checkpoint's model weights alone in one process (export).

The names other modules use are exported here.
"""

from seqpar.trainer.checkpoint.compat import data_record, model_config_of
from seqpar.trainer.checkpoint.files import read_meta, verify_files
from seqpar.trainer.checkpoint.manager import CheckpointManager, SaveFailed
from seqpar.trainer.checkpoint.model_weights import load_model_weights
from seqpar.trainer.checkpoint.paths import newest_if_root
from seqpar.trainer.checkpoint.resume import ResumePoint, find_resume
from seqpar.trainer.checkpoint.state import TrainState, training_states

__all__ = [
    "CheckpointManager", "ResumePoint", "SaveFailed", "TrainState", "data_record", "find_resume", "load_model_weights",
    "model_config_of", "newest_if_root", "read_meta", "training_states", "verify_files",
]
