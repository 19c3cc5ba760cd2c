"""BERT for masked-language modelling: post-LayerNorm encoder, token-type embeddings, MLM head tied to the embedding.

Single-device code, bidirectional attention with a key padding mask. Positions are an input.
"""

from __future__ import annotations

import torch
from torch import nn

from seqpar.config import ModelConfig
from seqpar.models.base import LanguageModel
from seqpar.models.bert.hf import HF
from seqpar.models.dropout import DropoutKey, KeyedDropout, block_sites
from seqpar.models.layers import MLP, SelfAttention, activation_fn
from seqpar.models.layout import BLOCK_TP_PLAN, ParallelLayout


class BertBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        attn_site, mlp_site = block_sites(layer)
        self.attn = SelfAttention(cfg)
        self.attn_out_dropout = KeyedDropout(cfg.dropout, attn_site)
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_out_dropout = KeyedDropout(cfg.dropout, mlp_site)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                dropout_key: DropoutKey | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.attn(x, key_padding_mask, document_ids=document_ids)  # (BERT's positions are embedded)
        x = self.ln_1(x + self.attn_out_dropout(attn, dropout_key))
        x = self.ln_2(x + self.mlp_out_dropout(self.mlp(x), dropout_key))
        return x  # (B, T, C)


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (weight tied to the word embedding) + bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation_fn(cfg.activation)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:  # (B, T, C) -> (B, T, V)
        features = self.ln(self.act(self.dense(x)))
        return self.decoder(features) if project else features


class BERT(LanguageModel):
    arch = "bert"
    hf = (HF,)  # transformers interop (hf.py)
    layout = ParallelLayout(
        tp_plan={"word_embeddings": "vocab_embedding_to_tokens", **BLOCK_TP_PLAN, "emb_ln": "token_norm",
                 "mlm_head": "gather_tokens", "mlm_head.decoder": "vocab_head"},
        token_sharded_outputs=("position_embeddings", "token_type_embeddings"),
        tied={"mlm_head.decoder.weight": "word_embeddings.weight"},
        embedding=("word_embeddings", "position_embeddings", "token_type_embeddings", "emb_ln"),
        head=("mlm_head",),
        position_params=("position_embeddings.weight",),
    )

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.emb_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = KeyedDropout(cfg.dropout, site=0)
        self.layers = nn.ModuleList(BertBlock(cfg, i) for i in range(cfg.num_layers))
        self.mlm_head = MLMHead(cfg)
        self.mlm_head.decoder.weight = self.word_embeddings.weight  # tied
        self.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor,  # (B, T) or (T,)
        attention_mask: torch.Tensor | None = None,  # (B, T), 1 = real token, 0 = padding
        token_type_ids: torch.Tensor | None = None,  # (B, T); None = all zeros
        prediction_mask: torch.Tensor | None = None,  # (B, T) bool: run the MLM head only at these positions
        dropout_seed: torch.Tensor | None = None,  # (B,) int64: masks from (seed, position), see dropout.py
        head_features_only: bool = False,  # return the output layer's input (..., C) instead of the logits
        document_ids: torch.Tensor | None = None,  # (B, T): attention within documents (validation refuses it)
    ) -> torch.Tensor:  # logits (B, T, V), or (N, V) for the N positions of prediction_mask in row-major order
        x = self.hidden_states(input_ids, position_ids, attention_mask, token_type_ids, dropout_seed, document_ids)
        if prediction_mask is not None:
            # Only the masked tokens (about 15%) are predicted in training: the head's vocabulary-wide matmuls and
            # the loss's log-softmax need not run at the others.
            x = x[prediction_mask]
        return self.head_features(x) if head_features_only else self.head(x)

    # The three parts of forward, so a pipeline stage can run the ones it holds.
    def embed(self, input_ids, position_ids, token_type_ids=None, dropout_key=None) -> torch.Tensor:  # (B, T) -> (B, T, C)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.drop(self.emb_ln(x + self.token_type_embeddings(token_type_ids)), dropout_key)

    def head_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> the output layer's input
        return self.mlm_head(x, project=False)

    def head(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> logits (B, T, V): the head module runs whole
        return self.mlm_head(x)
