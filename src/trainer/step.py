"""What a training or evaluation step computes on this rank: its part of the batch and each micro-batch's loss.

The loader gives a data-parallel rank its share of the global batch (whole sequences, with positions, labels and
masks made on the whole sequence); with sp > 1 each rank keeps its chunk of every sequence (`sequence_chunk`:
contiguous for BERT, zigzag for GPT); the chunk is then cut into micro-batches (`micro_batches`), and each one's
summed cross-entropy is `model_loss_sum`. The loop (`seqpar.trainer.loop`) divides the sums by the global target
count, so the step's loss is token-weighted over the global batch.
"""

from __future__ import annotations

import torch

from seqpar.data.mlm import IGNORE_INDEX
from seqpar.parallel.mesh import ParallelMesh
from seqpar.parallel.sequence import shard_batch
from seqpar.trainer.loss import loss_sum

# The batch's tensors the model takes (the rest, `labels`, go to the loss); every pipeline stage is passed them.
MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask", "token_type_ids", "dropout_seed", "document_ids")


def sequence_chunk(batch: dict[str, torch.Tensor], mesh: ParallelMesh, causal: bool) -> dict[str, torch.Tensor]:
    """This rank's part of its data-parallel share: its sequence chunk when sp > 1."""
    if mesh.sp == 1:
        return batch
    return shard_batch(batch, mesh.sp, mesh.local_rank("sp"), causal, mesh.ulysses)


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """`batch` cut along the batch dim into micro-batches of `size` sequences."""
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def model_loss_sum(forward, micro: dict[str, torch.Tensor], device: torch.device, targets_only: bool,
                   output_loss=None) -> torch.Tensor:
    """`forward(**inputs)`'s summed loss on a micro-batch. `targets_only` (BERT): the MLM head runs only at the
    target positions (`prediction_mask`), which gives the same loss for a fraction of the head's work.
    `output_loss(features, labels)`: the model stops before its output layer and this computes the loss from its
    input (`seqpar.trainer.loss.output_loss_sum`); None: the loss of the logits."""
    inputs = {k: micro[k].to(device) for k in MODEL_INPUTS if k in micro}
    if output_loss is not None:
        inputs["head_features_only"] = True
    loss = output_loss or loss_sum
    labels = micro["labels"].to(device)
    if not targets_only:
        return loss(forward(**inputs), labels)
    targets = labels != IGNORE_INDEX
    return loss(forward(**inputs, prediction_mask=targets), labels[targets])


def holds_loss(pipeline, mesh: ParallelMesh) -> bool:
    """Whether this rank's loss counts in the step's sum: under pipeline parallelism only the last stage has the
    loss, and tp ranks hold copies of it (count one)."""
    return pipeline.last and mesh.local_rank("tp") == 0
