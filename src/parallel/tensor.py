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

Grouped-query attention with more tp ranks than key/value heads (tp a multiple of kv_heads): rank r's query heads
all use key/value head r // (tp / kv_heads), so k_proj and v_proj (style `kv_colwise`) give each rank that head's
rows, replicated over the tp / kv_heads ranks that share it. Their DTensors live on the tp axis viewed as a 2-D mesh
(kv_heads, replicas) with placements (Shard(0), Replicate()): a checkpoint, `full_tensor` and a reshard see the
model's kv_heads heads once. Each copy's gradient is only its rank's query heads' share, so the projection's output
gives its gradient back as Partial over the replica axis: DTensor then makes the weight's gradient Partial there,
and `match_grad_placements` sums it over the ranks sharing the head (one all-reduce per parameter), which keeps the
copies equal through AdamW's update.

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
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from seqpar.models import set_core_attention
from seqpar.models.attention import masked_softmax_attention
from seqpar.models.dropout import DropoutKey, KeyedDropout, keyed_dropout
from seqpar.torch_compat import flatten_axes, unflatten_axis


def _style(name: str, kv_mesh=None):
    """The DTensor style of the plan's style `name`; `kv_mesh`: the tp axis as (kv_heads, replicas) where tp
    exceeds the key/value heads (`key_value_mesh`), else None."""
    return {
        "colwise": lambda: ColwiseParallel(),
        "kv_colwise": lambda: ColwiseParallel() if kv_mesh is None else ReplicatedKeyValue(kv_mesh),
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
    rank, size = tp_mesh.get_local_rank(), tp_mesh.size()
    layout = model.layout
    kv_heads = model.config.kv_heads
    kv_mesh = key_value_mesh(tp_mesh, kv_heads) if size > kv_heads else None
    plan = {name: _style(style, kv_mesh) for name, style in layout.tp_styles(shard_activations).items()}
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


def key_value_mesh(tp_mesh, kv_heads: int):
    """The tp axis as a 2-D mesh (kv, kv_replica) of shape (kv_heads, tp / kv_heads): tp rank r at (r // replicas,
    r % replicas), so the ranks holding copies of one key/value head are neighbours along `kv_replica`. Every rank
    calls it together (it makes the two axes' process groups)."""
    size = tp_mesh.size()
    assert size % kv_heads == 0, (size, kv_heads)  # validation.parallel.validate_layout refuses the rest
    mesh = unflatten_axis(tp_mesh, (kv_heads, size // kv_heads), ("kv", "kv_replica"))
    # Both axes flattened again (the tp group): DTensor sums a gradient Partial over both in one all-reduce.
    flatten_axes(mesh, ("kv", "kv_replica"), "kv_tp")
    return mesh


class ReplicatedKeyValue(ParallelStyle):
    """A key/value projection (nn.Linear) on the (kv, kv_replica) mesh of `key_value_mesh`: weight and bias
    (Shard(0), Replicate()), so each rank holds the rows of its query heads' key/value head. The input is the
    replicated hidden states (their gradient, Partial over both axes, is summed back as for `colwise`); the output is
    this rank's head as a local tensor whose gradient is declared Partial over `kv_replica`: each copy saw only its
    own query heads, and DTensor carries that into the weight's gradient."""

    def __init__(self, kv_mesh):
        super().__init__()
        self.kv_mesh = kv_mesh

    @staticmethod
    def _partition(name, module, mesh):
        for param_name, p in module.named_parameters():
            sharded = distribute_tensor(p, mesh, [Shard(0), Replicate()], src_data_rank=None)
            module.register_parameter(param_name, nn.Parameter(sharded, requires_grad=p.requires_grad))

    @staticmethod
    def _input(module, inputs, mesh):
        x, *rest = inputs
        return (DTensor.from_local(x, mesh, [Replicate(), Replicate()], run_check=False), *rest)

    @staticmethod
    def _output(module, out, mesh):
        return out.to_local(grad_placements=[Shard(out.dim() - 1), Partial()])

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        assert isinstance(module, nn.Linear), type(module)
        return distribute_module(module, self.kv_mesh, self._partition, self._input, self._output)


def _token_shard_hook(tp_mesh):
    """Forward hook: this rank's token shard of a replicated (.., T, C) output; backward all-gathers its gradient,
    so the (replicated) embedding gets the whole gradient on every rank."""
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
    return loss_parallel()
