"""Llama <-> transformers' LlamaForCausalLM and, with q/k/v biases (`model.qkv_bias`), Qwen2ForCausalLM: which
config attributes and weight names correspond (the same names in both)."""

from __future__ import annotations

from seqpar.config import ModelConfig
from seqpar.models.interop import HFInterop, StateDict, rename

FIELDS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
          "num_kv_heads": "num_key_value_heads", "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size",
          "max_seq_len": "max_position_embeddings", "attn_dropout": "attention_dropout",
          "layer_norm_eps": "rms_norm_eps", "init_std": "initializer_range"}


def _rope_theta(hf_config) -> float:
    return float((getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))


def _unsupported(hf_config, attention_bias: str | None) -> tuple[str, str] | None:
    """What a Llama/Qwen2 config asks for that our Llama lacks; `attention_bias`: the attribute that would put a
    bias on o_proj too (Llama's attention_bias)."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope_type={rope['rope_type']} (scaled rotary positions)", "use a checkpoint with default RoPE"
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim not in (None, hf_config.hidden_size // hf_config.num_attention_heads):
        return f"head_dim={head_dim} (not hidden_size / heads)", "use a checkpoint with the usual head size"
    if getattr(hf_config, "mlp_bias", False) or (attention_bias and getattr(hf_config, attention_bias, False)):
        return "biases on the MLP or the attention output", "use a checkpoint without them (Qwen2's q/k/v biases are fine)"
    if getattr(hf_config, "use_sliding_window", False):
        return "sliding-window attention", "use a checkpoint with full attention"
    return None


def _pairs(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(ours, transformers', transposed): the same layout (nn.Linear) on both sides."""
    pairs = [("embed_tokens", "model.embed_tokens", False), ("norm", "model.norm", False), ("lm_head", "lm_head", False)]
    for i in range(cfg.num_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(o + "ln_1", h + "input_layernorm", False), (o + "ln_2", h + "post_attention_layernorm", False)]
        pairs += [(o + f"attn.{p}", h + f"self_attn.{p}", False) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        pairs += [(o + f"mlp.{p}", h + f"mlp.{p}_proj", False) for p in ("gate", "up", "down")]
    return pairs


def from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = rename(sd, _pairs(cfg), to_hf=False)
    if cfg.tied_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    return rename(sd, _pairs(cfg), to_hf=True)


def _extra_config(cfg: ModelConfig) -> dict:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "head_dim": cfg.head_dim,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def _config_values(hf_config, qkv_bias: bool) -> dict:
    return {"rope_theta": _rope_theta(hf_config), "qkv_bias": qkv_bias,
            "tie_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False))}


LLAMA = HFInterop(
    model_type="llama", model_class="LlamaForCausalLM", config_class="LlamaConfig", fields=FIELDS,
    activations={"silu": "silu"}, activation_field="hidden_act",
    unsupported=lambda c: _unsupported(c, "attention_bias"), from_hf=from_hf, to_hf=to_hf,
    tied=("lm_head.weight",),  # the token embedding, when tied
    extra_config=lambda cfg: {**_extra_config(cfg), "attention_bias": False, "mlp_bias": False},
    config_values=lambda c: _config_values(c, qkv_bias=False),
    matches=lambda cfg: not cfg.qkv_bias,
    generates=True,
)

QWEN2 = HFInterop(
    model_type="qwen2", model_class="Qwen2ForCausalLM", config_class="Qwen2Config", fields=FIELDS,
    activations={"silu": "silu"}, activation_field="hidden_act",
    unsupported=lambda c: _unsupported(c, None), from_hf=from_hf, to_hf=to_hf,
    tied=("lm_head.weight",),
    extra_config=lambda cfg: {**_extra_config(cfg), "use_sliding_window": False},
    config_values=lambda c: _config_values(c, qkv_bias=True),
    matches=lambda cfg: cfg.qkv_bias,
    generates=True,
)
