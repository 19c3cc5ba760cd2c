"""GPT with the GPT-2 architecture: learned positions, pre-LayerNorm blocks, GELU MLP, head tied to the embedding.

Single-device code. Positions are an input, so a chunk of a longer sequence knows where it sits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seqpar.config import ModelConfig
from seqpar.models.layers import MLP, SelfAttention, init_weights


class GPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x), key_padding_mask))
        x = x + self.dropout(self.mlp(self.ln_2(x)))
        return x  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.arch == "gpt", cfg.arch
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        init_weights(self, std)
        # GPT-2 scales the residual-branch output projections by 1/sqrt(2 * layers).
        for block in self.layers:
            for lin in (block.attn.o_proj, block.mlp.down):
                nn.init.normal_(lin.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_layers))

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor,  # (B, T) or (T,)
        attention_mask: torch.Tensor | None = None,  # (B, T), 1 = real token; None = no padding
        token_type_ids: torch.Tensor | None = None,  # unused by GPT; accepted for one calling convention
    ) -> torch.Tensor:  # logits (B, T, V)
        x = self.embed(input_ids, position_ids, token_type_ids)
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None
        for block in self.layers:
            x = block(x, key_padding_mask)
        return self.head(x)

    # The three parts of forward, so a pipeline stage can run the ones it holds.
    def embed(self, input_ids, position_ids, token_type_ids=None) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return self.drop(self.wte(input_ids) + self.wpe(position_ids))

    def head(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> logits (B, T, V)
        return self.lm_head(self.ln_f(x))
