"""Tensor parallelism: Megatron-style sharding of the single-device model with DTensor.

A plan is data each model declares (`model.layout.tp_plan`, `seqpar.models.layout`): module name (wildcards
allowed) -> style. Attention is sharded by heads (q/k/v column-parallel, so
each rank computes attention for its own heads, and the sequence-parallel attention runs on those local heads;
o_proj row-parallel, one all-reduce), the MLP likewise (up column-parallel, down row-parallel). The token embedding
is vocab-parallel (each rank holds V/tp rows; lookups outside a rank's rows give 0 and one all-reduce sums them) and
the tied output layer is column-parallel over the vocabulary, returning vocab-sharded logits as a DTensor: the loss
is then computed under `loss_parallel()`, which never gathers the full-vocabulary logits. Positions, token types,
LayerNorms and BERT's MLM transform stay replicated.

Communication per layer: forward one all-reduce after o_proj and one after mlp.down (plus one after the embedding);
backward the mirror all-reduces of the column-parallel inputs' gradients.

`parallel.tp_shard_activations=true` adds Megatron's activation sharding (its "sequence parallelism" inside the
tensor-parallel region, a different thing from our `sp`): between the attention and MLP regions each tp rank keeps
only T/tp tokens of the hidden states, so the LayerNorms, dropouts and residual adds run on a tp-th of the
activations and store a tp-th of them. Each all-reduce becomes a reduce-scatter into the token shards (o_proj,
mlp.down, the embedding) and an all-gather before the next column-parallel layer (the same bytes moved). The
LayerNorm weights become replicated DTensors whose gradients DTensor sums over the tp ranks.

Dropout: hidden dropout draws each token's mask from the token's key (`seqpar.models.dropout`), so replicated
activations get identical masks on every tp rank, and a rank holding a token shard draws its tokens' part.
Attention dropout (sp = 1 only) draws from torch's RNG, whose state every tp rank keeps the same: on its own heads
a rank draws the mask of all heads and keeps its slice, exactly the mask one process would draw.
"""

from __future__ import annotations

import torch
from torch import nn

from seqpar.models import set_core_attention
from seqpar.models.attention import masked_softmax_attention
from seqpar.models.dropout import DropoutKey, KeyedDropout, keyed_dropout


def _style(name: str):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    return {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        "vocab_embedding": lambda: RowwiseParallel(input_layouts=Replicate()),
        "vocab_head": lambda: ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        "vocab_embedding_to_tokens": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "rowwise_to_tokens": lambda: RowwiseParallel(output_layouts=Shard(1)),
        "token_norm": lambda: SequenceParallel(sequence_dim=1, use_local_output=True),
        "gather_tokens": lambda: PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                    use_local_output=True),
        "gather_tokens_with_mask": lambda: PrepareModuleInput(input_layouts=(Shard(1), None),
                                                              desired_input_layouts=(Replicate(), None),
                                                              use_local_output=True),
        "vocab_head_from_tokens": lambda: ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                                          use_local_output=False),
    }[name]()


def tie(model: nn.Module) -> None:
    """Point the output layer's weight at the embedding's again (sharding makes each a separate parameter)."""
    for head, emb in model.layout.tied.items():
        owner, _, attr = head.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(emb))


def apply_tensor_parallel(model: nn.Module, tp_mesh, attn_dropout: float = 0.0, shard_activations: bool = False) -> None:
    """Shard `model` in place over the 1-D device mesh `tp_mesh` with the plan its layout declares
    (`model.layout.tp_plan`); with `shard_activations`, also the LayerNorm/dropout regions by tokens (Megatron's
    activation sharding)."""
    from torch.distributed.tensor.parallel import parallelize_module

    rank, size = tp_mesh.get_local_rank(), tp_mesh.size()
    layout = model.layout
    plan = {name: _style(style) for name, style in layout.tp_styles(shard_activations).items()}
    parallelize_module(model, tp_mesh, plan)
    tie(model)
    if attn_dropout > 0:
        set_core_attention(model, HeadShardedDropoutAttention(rank, size))
    if shard_activations:
        for name in layout.token_sharded_outputs:
            model.get_submodule(name).register_forward_hook(_token_shard_hook(tp_mesh))
        for parent in list(model.modules()):
            for child_name, child in parent.named_children():
                if isinstance(child, KeyedDropout):
                    setattr(parent, child_name, TokenShardedDropout(child.p, child.site, rank, size))


def _token_shard_hook(tp_mesh):
    """Forward hook: this rank's token shard of a replicated (.., T, C) output; backward all-gathers its gradient,
    so the (replicated) embedding gets the whole gradient on every rank."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def hook(module, inputs, out):
        full = DTensor.from_local(out, tp_mesh, [Replicate()], run_check=False)
        return full.redistribute(tp_mesh, [Shard(out.dim() - 2)]).to_local()

    return hook


def _mask_slice(shape: tuple[int, ...], dim: int, rank: int, size: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """This rank's slice (along `dim`, the `size`-times larger whole) of the dropout mask one process would draw
    for the whole tensor: keep / (1 - p), drawn from the RNG stream every tp rank shares."""
    whole = list(shape)
    whole[dim] *= size
    keep = torch.empty(whole, dtype=like.dtype, device=like.device).bernoulli_(1 - p)
    return keep.narrow(dim, rank * shape[dim], shape[dim]).div_(1 - p)


class TokenShardedDropout(KeyedDropout):
    """Dropout of token-sharded (.., T/tp, C) activations with this rank's tokens' part of the whole mask: the key of
    its tokens (the masks are drawn per token position, `seqpar.models.dropout`), or without a key this rank's
    slice of the mask drawn for the whole tensor from the RNG stream the tp ranks share."""

    def __init__(self, p: float, site: int, rank: int, size: int):
        super().__init__(p, site)
        self.rank, self.size = rank, size

    def forward(self, x: torch.Tensor, key: DropoutKey | None = None) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.shape[-2]  # this rank's T/tp tokens
        if key is not None:
            return keyed_dropout(x, key.tokens(self.rank * n, n), self.site, self.p)
        return x * _mask_slice(tuple(x.shape), x.dim() - 2, self.rank, self.size, self.p, x)


class HeadShardedDropoutAttention:
    """Core attention with dropout on this rank's heads: the probabilities' mask is this rank's heads' part of the
    mask for all heads, as one process draws it (PyTorch's math attention kernel, which CPU SDPA uses whenever
    dropout is on, draws one Bernoulli mask over (B, H, Tq, Tk))."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def __call__(self, q, k, v, *, causal, key_padding_mask, dropout_p, document_ids=None):
        keep = None
        if dropout_p > 0:
            keep = lambda probs: probs * _mask_slice(tuple(probs.shape), 1, self.rank, self.size, dropout_p, probs)  # noqa: E731
        return masked_softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout=keep,
                                        document_ids=document_ids)


def loss_context(tp: int):
    """Where the loss (forward and backward) of vocab-sharded logits must run."""
    import contextlib

    if tp == 1:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()
