"""Llama: pre-RMSNorm blocks, rotary positions, a SwiGLU MLP and grouped-query attention (`model.num_kv_heads`);
with `model.qkv_bias`, Qwen2's q/k/v biases. The head is untied from the token embedding unless
`model.tie_embeddings` says otherwise.

Single-device code. Rotary positions are computed from the `position_ids` input (no learned table, so
`model.max_seq_len` adds no parameters): a chunk of a longer sequence rotates by its global positions, so sequence
parallelism needs nothing special.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from seqpar.config import ModelConfig
from seqpar.models.base import LanguageModel
from seqpar.models.dropout import KeyedDropout
from seqpar.models.layers import GatedMLP, PreNormBlock, SelfAttention
from seqpar.models.layout import BLOCK_TP_PLAN, ParallelLayout
from seqpar.models.llama.hf import LLAMA, QWEN2


def llama_block(cfg: ModelConfig, layer: int) -> PreNormBlock:
    """Llama's block: RMSNorms, grouped-query attention with rotary positions (q/k/v biases with qkv_bias), SwiGLU."""
    return PreNormBlock(cfg, layer, nn.RMSNorm, SelfAttention(cfg, bias=False, rotary=True), GatedMLP(cfg))


class Llama(LanguageModel):
    arch = "llama"
    hf = (LLAMA, QWEN2)  # transformers interop (hf.py): Qwen2 when model.qkv_bias
    layout = ParallelLayout(
        tp_plan={"embed_tokens": "vocab_embedding_to_tokens", **BLOCK_TP_PLAN, "layers.*.mlp.gate": "colwise",
                 "norm": "token_norm", "lm_head": "vocab_head_from_tokens"},
        token_sharded_outputs=(),
        tied={},  # untied by default; see layout_for
        embedding=("embed_tokens",),
        head=("norm", "lm_head"),
        mlp_ffn_tensors=4,  # SwiGLU
    )

    @classmethod
    def layout_for(cls, cfg: ModelConfig) -> ParallelLayout:
        if cfg.tied_embeddings:
            return dataclasses.replace(cls.layout, tied={"lm_head.weight": "embed_tokens.weight"})
        return cls.layout

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.drop = KeyedDropout(cfg.dropout, site=0)
        self.layers = nn.ModuleList(llama_block(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tied_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    # The three parts of forward, so a pipeline stage can run the ones it holds.
    def embed(self, input_ids, position_ids, token_type_ids=None, dropout_key=None) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return self.drop(self.embed_tokens(input_ids), dropout_key)

    def head_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> the output layer's input
        return self.norm(x)
