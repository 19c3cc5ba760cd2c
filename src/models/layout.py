"""What parallelism needs to know about a model, declared as data beside it (no torch.distributed here).

Each model class carries a `layout: ParallelLayout`. `seqpar.parallel` (tensor plans, pipeline parts, tied weights),
the memory planner and weight gathering read it, so adding a model touches its own module only.

Tensor-parallel styles (the names `seqpar.parallel.tensor` turns into DTensor styles):
- `colwise` / `rowwise`: Megatron's column- and row-parallel linear layers (weight and bias split / weight split,
  bias replicated);
- `kv_colwise`: the key/value projections, column-parallel by key/value heads like `colwise` where tp divides their
  head count; where tp is a multiple of it, each rank holds the one head its query heads use, replicated over the
  tp / kv_heads ranks that share it (Megatron's and vLLM's key/value replication);
- `vocab_embedding`, `vocab_head`: the embedding and the tied output layer sharded by vocabulary rows;
- with activation sharding: `vocab_embedding_to_tokens`, `rowwise_to_tokens` (outputs cut into token shards),
  `token_norm` (a LayerNorm on token shards), `gather_tokens` / `gather_tokens_with_mask` (all-gather the tokens
  before a column-parallel region), `vocab_head_from_tokens`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

# Every transformer block: attention by heads (q/k/v column-parallel, o row-parallel), MLP by hidden units, and with
# Megatron's activation sharding the LayerNorm/dropout regions hold T/tp tokens (dim 1 of (B, T, C)).
_BLOCK_MATMULS = {
    "layers.*.attn.q_proj": "colwise",
    "layers.*.attn.k_proj": "kv_colwise",
    "layers.*.attn.v_proj": "kv_colwise",
    "layers.*.attn.o_proj": "rowwise",
    "layers.*.mlp.up": "colwise",
    "layers.*.mlp.down": "rowwise",
}
BLOCK_TP_PLAN = {
    **_BLOCK_MATMULS,
    "layers.*.attn": "gather_tokens_with_mask",  # one all-gather of the input (x, key_padding_mask) before q/k/v
    "layers.*.attn.o_proj": "rowwise_to_tokens",  # reduce-scatter into token shards
    "layers.*.mlp": "gather_tokens",
    "layers.*.mlp.down": "rowwise_to_tokens",
    "layers.*.ln_1": "token_norm",
    "layers.*.ln_2": "token_norm",
}
# What each activation-sharding style is without activation sharding (None: the module is left replicated).
_WITHOUT_TOKEN_SHARDS = {"vocab_embedding_to_tokens": "vocab_embedding", "rowwise_to_tokens": "rowwise",
                         "vocab_head_from_tokens": "vocab_head", "token_norm": None, "gather_tokens": None,
                         "gather_tokens_with_mask": None}
_VOCAB_HEADS = ("vocab_head", "vocab_head_from_tokens")
_SPLIT_WEIGHT_AND_BIAS = ("colwise", "kv_colwise", "vocab_head", "vocab_head_from_tokens")
_SPLIT_WEIGHT = ("rowwise", "rowwise_to_tokens", "vocab_embedding", "vocab_embedding_to_tokens")


@dataclass(frozen=True)
class ParallelLayout:
    tp_plan: dict[str, str]  # module name (wildcards allowed) -> tensor-parallel style, with activation sharding
    token_sharded_outputs: tuple[str, ...]  # embeddings of replicated inputs whose output is cut into token shards
    tied: dict[str, str]  # output layer weight -> the embedding weight it shares
    embedding: tuple[str, ...]  # modules the first pipeline stage holds (before `layers`)
    head: tuple[str, ...]  # modules the last pipeline stage holds (after `layers`)
    position_params: tuple[str, ...] = field(default=())  # lookups, not matmuls (left out of the FLOP count)
    # ffn-wide tensors the MLP keeps for backward, per token (the planner's activation memory): a GELU MLP two (the
    # up projection's output and its activation), SwiGLU four (the gate and up outputs, the activation, their product)
    mlp_ffn_tensors: int = 2

    def tp_styles(self, shard_activations: bool) -> dict[str, str]:
        """The tensor-parallel plan as declared (`parallel.tp_shard_activations`), or without activation sharding:
        token-shard styles become their plain ones and the token regions stay replicated."""
        if shard_activations:
            return dict(self.tp_plan)
        plain = {name: _WITHOUT_TOKEN_SHARDS.get(style, style) for name, style in self.tp_plan.items()}
        return {name: style for name, style in plain.items() if style is not None}

    @property
    def output_layer(self) -> str:
        """The module that projects to the vocabulary (the tp plan's vocabulary-parallel head)."""
        return next(name for name, style in self.tp_plan.items() if style in _VOCAB_HEADS)

    def output_takes_token_shards(self, shard_activations: bool) -> bool:
        """Whether the output layer's input is cut into token shards (it gathers them itself)."""
        return shard_activations and self.tp_plan[self.output_layer] == "vocab_head_from_tokens"

    def tp_parts(self, param: str, tp: int, kv_heads: int) -> int:
        """Into how many parts tensor parallelism over `tp` ranks splits the parameter `param` (each rank holds one):
        tp for a split matrix, min(tp, kv_heads) for a key/value projection (beyond its heads each rank holds a whole
        head, replicated), 1 for a replicated parameter."""
        owner, _, attr = param.rpartition(".")
        for pattern, style in self.tp_styles(shard_activations=False).items():
            if fnmatch.fnmatchcase(owner, pattern):
                if not (style in _SPLIT_WEIGHT_AND_BIAS or (style in _SPLIT_WEIGHT and attr == "weight")):
                    return 1
                return min(tp, kv_heads) if style == "kv_colwise" else tp
        return 1

    def in_head(self, param: str) -> bool:
        return param.split(".")[0] in self.head
