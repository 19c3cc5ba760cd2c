"""The model section: sizes, dropout, the attention kind, and the settings only Llama has."""

from __future__ import annotations

from seqpar.config import ACTIVATIONS, ARCHS, ATTENTIONS, ModelConfig
from seqpar.errors import UserError
from seqpar.validation.fields import choice, fraction, positive


def validate_model(m: ModelConfig) -> None:
    choice("model.arch", m.arch, ARCHS)
    choice("model.activation", m.activation, ACTIVATIONS)
    for name in ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_seq_len"):
        positive(f"model.{name}", getattr(m, name))
    if m.ffn_hidden_size is not None:
        positive("model.ffn_hidden_size", m.ffn_hidden_size)
    if m.hidden_size % m.num_heads:
        raise UserError(
            "model.hidden_size",
            f"({m.hidden_size}) is not divisible by model.num_heads ({m.num_heads})",
            "choose num_heads that divides hidden_size",
        )
    fraction("model.dropout", m.dropout)
    fraction("model.attn_dropout", m.attn_dropout)
    positive("model.layer_norm_eps", m.layer_norm_eps)
    positive("model.init_std", m.init_std)
    positive("model.type_vocab_size", m.type_vocab_size)
    choice("model.attention", m.attention, ATTENTIONS)
    validate_llama_fields(m)
    if m.attention == "linformer":
        if m.causal:
            raise UserError("model.attention", f"is linformer with model.arch={m.arch}; Linformer's projection mixes "
                              "every position of the sequence, which a causal model must not see",
                              "use model.attention=linformer with BERT (model=bert_*), or softmax")
        positive("model.linformer_k", m.linformer_k)


def validate_llama_fields(m: ModelConfig) -> None:
    """Grouped-query attention, rotary positions and q/k/v biases are Llama's (model.arch=llama); GPT and BERT keep
    their defaults."""
    if m.arch != "llama":
        defaults = ModelConfig()
        for name in ("num_kv_heads", "rope_theta", "qkv_bias"):
            if getattr(m, name) != getattr(defaults, name) and not (name == "num_kv_heads" and m.num_kv_heads == m.num_heads):
                raise UserError(f"model.{name}", f"is {getattr(m, name)} with model.arch={m.arch}, which has no such "
                                "setting (it is Llama's)", f"drop model.{name} or use model=llama_tiny (model.arch=llama)")
        if m.tie_embeddings is False:
            raise UserError("model.tie_embeddings", f"is false with model.arch={m.arch}, whose output layer is the "
                            "token embedding", "drop model.tie_embeddings (only Llama can untie them)")
        return
    if m.num_kv_heads is not None:
        positive("model.num_kv_heads", m.num_kv_heads)
        if m.num_heads % m.num_kv_heads:
            raise UserError("model.num_kv_heads", f"({m.num_kv_heads}) does not divide model.num_heads ({m.num_heads}); "
                            "each key/value head serves an equal group of query heads",
                            "choose num_kv_heads dividing num_heads")
    positive("model.rope_theta", m.rope_theta)
    if m.attention != "softmax":
        raise UserError("model.attention", f"is {m.attention} with model.arch=llama", "use model.attention=softmax")
    if m.head_dim % 2:
        raise UserError("model.hidden_size", f"gives an odd head size ({m.head_dim}); rotary embeddings rotate pairs "
                        "of features", "choose hidden_size / num_heads even")
