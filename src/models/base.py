"""What every model here shares: `LanguageModel`, built from its ModelConfig, declaring its parallel layout
(`layout`) and transformers interop (`hf`), initialised per parameter name, and run in three parts (`embed`, the
blocks of `layers`, `head`) so that a pipeline stage can run the parts it holds. The head is the features it
computes (`head_features`) and the output layer that projects them to the vocabulary (`output_layer`): a loss that
never builds the whole logits (`seqpar.trainer.loss.linear_loss_sum`) takes the two apart."""

from __future__ import annotations

import torch
from torch import nn

from seqpar.config import ModelConfig
from seqpar.models.dropout import DropoutKey
from seqpar.models.interop import HFInterop
from seqpar.models.layers import init_parameters
from seqpar.models.layout import ParallelLayout


class LanguageModel(nn.Module):
    """A subclass defines `embed(input_ids, position_ids, token_type_ids, dropout_key)` -> (B, T, C), the blocks
    `layers` (each `block(x, key_padding_mask, dropout_key, position_ids, document_ids)`), `head_features(x)` -> (..., C), the
    output layer named by its layout, and `forward` (whose `head_features_only=True` stops before the output layer).
    `layout_for(cfg)` is its parallel layout for a config (the class's `layout` unless the config changes it: Llama's
    tied or untied head); an instance's `layout` is its own config's."""

    arch: str  # the model.arch it implements
    layout: ParallelLayout
    hf: tuple[HFInterop, ...]  # the transformers classes it matches (models/hf.py)
    layers: nn.ModuleList

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.arch == self.arch, (cfg.arch, self.arch)
        self.config = cfg
        self.layout = self.layout_for(cfg)

    @classmethod
    def layout_for(cls, cfg: ModelConfig) -> ParallelLayout:
        return cls.layout

    def reset_parameters(self) -> None:
        init_parameters(self)

    def init_std(self, name: str) -> float:
        """The standard deviation of the initial weight `name`."""
        return self.config.init_std

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None,
                      dropout_seed: torch.Tensor | None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding and every block: (B, T) token ids -> (B, T, C); with `document_ids`, attention stays
        inside each token's document."""
        key = DropoutKey(dropout_seed, position_ids) if dropout_seed is not None else None
        x = self.embed(input_ids, position_ids, token_type_ids, key)
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None
        for block in self.layers:
            x = block(x, key_padding_mask, key, position_ids, document_ids)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor,  # (B, T) or (T,): global positions (a sequence chunk knows where it sits)
        attention_mask: torch.Tensor | None = None,  # (B, T), 1 = real token; None = no padding
        token_type_ids: torch.Tensor | None = None,  # BERT's segments; accepted by every model for one convention
        dropout_seed: torch.Tensor | None = None,  # (B,) int64: masks from (seed, position), see dropout.py
        head_features_only: bool = False,  # return the output layer's input (B, T, C) instead of the logits
        document_ids: torch.Tensor | None = None,  # (B, T) int: each token's document (data.document_mask)
    ) -> torch.Tensor:  # logits (B, T, V)
        """A decoder's forward (BERT's adds its target-token head)."""
        x = self.hidden_states(input_ids, position_ids, attention_mask, token_type_ids, dropout_seed, document_ids)
        return self.head_features(x) if head_features_only else self.head(x)

    @property
    def output_layer(self) -> nn.Module:
        """The layer that projects the head's features to the vocabulary."""
        return self.get_submodule(self.layout.output_layer)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states -> (..., V) logits."""
        return self.output_layer(self.head_features(x))
