"""Tensor parallelism: Megatron-style sharding of the single-device model with DTensor.

A plan is data: module name (wildcards allowed) -> style. Attention is sharded by heads (q/k/v column-parallel, so
each rank computes attention for its own heads, and the sequence-parallel attention runs on those local heads;
o_proj row-parallel, one all-reduce), the MLP likewise (up column-parallel, down row-parallel). The token embedding
is vocab-parallel (each rank holds V/tp rows; lookups outside a rank's rows give 0 and one all-reduce sums them) and
the tied output layer is column-parallel over the vocabulary, returning vocab-sharded logits as a DTensor: the loss
is then computed under `loss_parallel()`, which never gathers the full-vocabulary logits. Positions, token types,
LayerNorms and BERT's MLM transform stay replicated.

Communication per layer: forward one all-reduce after o_proj and one after mlp.down (plus one after the embedding);
backward the mirror all-reduces of the column-parallel inputs' gradients.
"""

from __future__ import annotations

from torch import nn

# Every transformer block: attention by heads (q/k/v column-parallel, o row-parallel), MLP by hidden units.
BLOCK_PLAN = {
    "layers.*.attn.q_proj": "colwise",
    "layers.*.attn.k_proj": "colwise",
    "layers.*.attn.v_proj": "colwise",
    "layers.*.attn.o_proj": "rowwise",
    "layers.*.mlp.up": "colwise",
    "layers.*.mlp.down": "rowwise",
}
PLANS: dict[str, dict[str, str]] = {
    "gpt": {"wte": "vocab_embedding", **BLOCK_PLAN, "lm_head": "vocab_head"},
    "bert": {"word_embeddings": "vocab_embedding", **BLOCK_PLAN, "mlm_head.decoder": "vocab_head"},
}

# Output layer weight -> the embedding weight it is tied to (both are sharded by vocabulary rows).
TIED: dict[str, tuple[str, str]] = {
    "gpt": ("lm_head.weight", "wte.weight"),
    "bert": ("mlm_head.decoder.weight", "word_embeddings.weight"),
}


def _style(name: str):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        "vocab_embedding": lambda: RowwiseParallel(input_layouts=Replicate()),
        "vocab_head": lambda: ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }[name]()


def _get(model: nn.Module, dotted: str):
    obj = model
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def tie(model: nn.Module, arch: str) -> None:
    """Point the output layer's weight at the embedding's again (sharding makes each a separate parameter)."""
    head, emb = TIED[arch]
    owner, _, attr = head.rpartition(".")
    setattr(_get(model, owner), attr, _get(model, emb))


def apply_tensor_parallel(model: nn.Module, tp_mesh, arch: str) -> None:
    """Shard `model` in place over the 1-D device mesh `tp_mesh` with the plan for `arch`."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan = {name: _style(style) for name, style in PLANS[arch].items()}
    parallelize_module(model, tp_mesh, plan)
    tie(model, arch)


def loss_context(tp: int):
    """Where the loss (forward and backward) of vocab-sharded logits must run."""
    import contextlib

    if tp == 1:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()
