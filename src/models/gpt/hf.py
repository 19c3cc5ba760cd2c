"""GPT <-> transformers' GPT2LMHeadModel: which config attributes and weight names correspond."""

from __future__ import annotations

import torch

from seqpar.config import ModelConfig
from seqpar.models.interop import HFInterop, StateDict, rename


def unsupported(hf_config) -> tuple[str, str] | None:
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False) or not getattr(hf_config, "scale_attn_weights", True):
        return "non-standard attention scaling", "use a standard GPT-2 checkpoint"
    if not getattr(hf_config, "tie_word_embeddings", True):
        return "an untied LM head", "use a checkpoint with tied embeddings"
    return None


def _pairs(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(ours, transformers' without its `transformer.` prefix, transposed): HF's Conv1D stores weights as (in, out)."""
    pairs = [("wte", "wte", False), ("wpe", "wpe", False), ("ln_f", "ln_f", False)]
    for i in range(cfg.num_layers):
        o, h = f"layers.{i}.", f"h.{i}."
        pairs += [(o + "attn.o_proj", h + "attn.c_proj", True), (o + "mlp.up", h + "mlp.c_fc", True),
                  (o + "mlp.down", h + "mlp.c_proj", True), (o + "ln_1", h + "ln_1", False),
                  (o + "ln_2", h + "ln_2", False)]
    return pairs


def from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out = rename(sd, _pairs(cfg), to_hf=False)
    c = cfg.hidden_size
    for i in range(cfg.num_layers):  # q, k and v are one (in, 3 * out) matrix there
        w_qkv, b_qkv = sd[f"h.{i}.attn.c_attn.weight"], sd[f"h.{i}.attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"layers.{i}.attn.{name}.weight"] = w_qkv[:, j * c : (j + 1) * c].t()
            out[f"layers.{i}.attn.{name}.bias"] = b_qkv[j * c : (j + 1) * c]
    out["lm_head.weight"] = out["wte.weight"]
    return out


def to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = {"transformer." + k: v for k, v in rename(sd, _pairs(cfg), to_hf=True).items()}
    for i in range(cfg.num_layers):
        names = [f"layers.{i}.attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([sd[n + ".weight"] for n in names], dim=0).t()
        out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat([sd[n + ".bias"] for n in names])
    out["lm_head.weight"] = sd["wte.weight"]
    return out


HF = HFInterop(
    model_type="gpt2", model_class="GPT2LMHeadModel", config_class="GPT2Config",
    fields={"num_layers": "n_layer", "hidden_size": "n_embd", "num_heads": "n_head", "ffn_hidden_size": "n_inner",
            "vocab_size": "vocab_size", "max_seq_len": "n_positions", "dropout": "resid_pdrop",
            "attn_dropout": "attn_pdrop", "layer_norm_eps": "layer_norm_epsilon", "init_std": "initializer_range"},
    activations={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"},
    activation_field="activation_function",
    unsupported=unsupported, from_hf=from_hf, to_hf=to_hf,
    tied=("lm_head.weight",),  # the token embedding
    extra_config=lambda cfg: {"n_inner": cfg.ffn_size, "embd_pdrop": cfg.dropout, "bos_token_id": None,
                              "eos_token_id": None},
    defaults=lambda hf_config: {"ffn_hidden_size": 4 * hf_config.n_embd},
    generates=True,
)
