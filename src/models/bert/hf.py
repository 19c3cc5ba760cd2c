"""BERT <-> transformers' BertForMaskedLM: which config attributes and weight names correspond."""

from __future__ import annotations

from seqpar.config import ModelConfig
from seqpar.models.interop import HFInterop, StateDict, rename


def unsupported(hf_config) -> tuple[str, str] | None:
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type={hf_config.position_embedding_type}", "use absolute positions"
    if getattr(hf_config, "is_decoder", False):
        return "is_decoder=True", "use an encoder (BertForMaskedLM) checkpoint"
    return None


# (ours, transformers') names, per layer and for the rest; weights have the same layout.
_LAYER = [
    ("attn.q_proj", "attention.self.query"),
    ("attn.k_proj", "attention.self.key"),
    ("attn.v_proj", "attention.self.value"),
    ("attn.o_proj", "attention.output.dense"),
    ("ln_1", "attention.output.LayerNorm"),
    ("mlp.up", "intermediate.dense"),
    ("mlp.down", "output.dense"),
    ("ln_2", "output.LayerNorm"),
]
_REST = [
    ("word_embeddings", "bert.embeddings.word_embeddings"),
    ("position_embeddings", "bert.embeddings.position_embeddings"),
    ("token_type_embeddings", "bert.embeddings.token_type_embeddings"),
    ("emb_ln", "bert.embeddings.LayerNorm"),
    ("mlm_head.dense", "cls.predictions.transform.dense"),
    ("mlm_head.ln", "cls.predictions.transform.LayerNorm"),
]


def _pairs(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    pairs = [(ours, theirs, False) for ours, theirs in _REST]
    for i in range(cfg.num_layers):
        pairs += [(f"layers.{i}.{a}", f"bert.encoder.layer.{i}.{b}", False) for a, b in _LAYER]
    return pairs


def from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = rename(sd, _pairs(cfg), to_hf=False)
    out["mlm_head.decoder.weight"] = out["word_embeddings.weight"]
    out["mlm_head.decoder.bias"] = sd.get("cls.predictions.decoder.bias", sd.get("cls.predictions.bias"))
    return out


def to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = rename(sd, _pairs(cfg), to_hf=True)
    out["cls.predictions.decoder.weight"] = sd["word_embeddings.weight"]
    out["cls.predictions.bias"] = sd["mlm_head.decoder.bias"]
    out["cls.predictions.decoder.bias"] = sd["mlm_head.decoder.bias"]
    return out


HF = HFInterop(
    model_type="bert", model_class="BertForMaskedLM", config_class="BertConfig",
    fields={"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
            "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size",
            "max_seq_len": "max_position_embeddings", "dropout": "hidden_dropout_prob",
            "attn_dropout": "attention_probs_dropout_prob", "layer_norm_eps": "layer_norm_eps",
            "type_vocab_size": "type_vocab_size", "init_std": "initializer_range"},
    activations={"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"},
    activation_field="hidden_act",
    unsupported=unsupported, from_hf=from_hf, to_hf=to_hf,
    tied=("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),  # the word embedding; the bias's copy
    extra_config=lambda cfg: {"intermediate_size": cfg.ffn_size, "pad_token_id": 0},
)
