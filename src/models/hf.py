"""Hugging Face interop: our GPT <-> GPT2LMHeadModel and our BERT <-> BertForMaskedLM, weights and configs.

`from_pretrained(dir_or_model)` returns (our model, its ModelConfig); `save_pretrained(model, dir)` writes a directory
that `transformers` loads. Everything works offline on local directories (safetensors).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqpar.config import ModelConfig
from seqpar.errors import UserError
from seqpar.models import build_model
from seqpar.validation import validate_model

_GPT_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
_BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


# ----------------------------------------------------------------------------------------------------- configs
def _unsupported(what: str, fix: str) -> UserError:
    return UserError("model.init_from", f"is a checkpoint with {what}, which seqpar's models do not implement", fix)


def config_from_hf(hf_config: Any, name: str = "hf") -> ModelConfig:
    """Our ModelConfig for a transformers GPT2Config or BertConfig (refusing options our models lack)."""
    mt = hf_config.model_type
    if mt == "gpt2":
        act = _GPT_ACTIVATIONS.get(hf_config.activation_function)
        if act is None:
            raise _unsupported(f"activation_function={hf_config.activation_function}", "use a gelu variant")
        if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False) or not getattr(hf_config, "scale_attn_weights", True):
            raise _unsupported("non-standard attention scaling", "use a standard GPT-2 checkpoint")
        if not getattr(hf_config, "tie_word_embeddings", True):
            raise _unsupported("an untied LM head", "use a checkpoint with tied embeddings")
        cfg = ModelConfig(
            name=name,
            arch="gpt",
            num_layers=hf_config.n_layer,
            hidden_size=hf_config.n_embd,
            num_heads=hf_config.n_head,
            ffn_hidden_size=hf_config.n_inner or 4 * hf_config.n_embd,
            vocab_size=hf_config.vocab_size,
            max_seq_len=hf_config.n_positions,
            dropout=hf_config.resid_pdrop,
            attn_dropout=hf_config.attn_pdrop,
            layer_norm_eps=hf_config.layer_norm_epsilon,
            activation=act,
            init_std=hf_config.initializer_range,
        )
    elif mt == "bert":
        act = _BERT_ACTIVATIONS.get(hf_config.hidden_act) if isinstance(hf_config.hidden_act, str) else None
        if act is None:
            raise _unsupported(f"hidden_act={hf_config.hidden_act}", "use a gelu variant")
        if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
            raise _unsupported(f"position_embedding_type={hf_config.position_embedding_type}", "use absolute positions")
        if getattr(hf_config, "is_decoder", False):
            raise _unsupported("is_decoder=True", "use an encoder (BertForMaskedLM) checkpoint")
        cfg = ModelConfig(
            name=name,
            arch="bert",
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            num_heads=hf_config.num_attention_heads,
            ffn_hidden_size=hf_config.intermediate_size,
            vocab_size=hf_config.vocab_size,
            max_seq_len=hf_config.max_position_embeddings,
            dropout=hf_config.hidden_dropout_prob,
            attn_dropout=hf_config.attention_probs_dropout_prob,
            layer_norm_eps=hf_config.layer_norm_eps,
            activation=act,
            type_vocab_size=hf_config.type_vocab_size,
            init_std=hf_config.initializer_range,
        )
    else:
        raise UserError("model.init_from", f"has model_type={mt!r}", "use a gpt2 or bert checkpoint")
    validate_model(cfg)
    return cfg


def hf_config_from(cfg: ModelConfig) -> Any:
    """A transformers GPT2Config or BertConfig equal to our ModelConfig."""
    from transformers import BertConfig, GPT2Config

    if cfg.arch == "gpt":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation]
        return GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.ffn_size,
            activation_function=act,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.attn_dropout,
            layer_norm_epsilon=cfg.layer_norm_eps,
            initializer_range=cfg.init_std,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=True,
            torch_dtype="float32",
        )
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation]
    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act=act,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attn_dropout,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        initializer_range=cfg.init_std,
        pad_token_id=0,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )


def read_checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    """Our ModelConfig for a local transformers directory, reading only its config.json (cheap: for validation)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(
            "model.init_from", f"({path}) is not a transformers checkpoint directory (no config.json)", "pass a directory written by save_pretrained"
        )
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError("model.init_from", f"({path}) has an unreadable config.json ({first})", "re-export the checkpoint") from None
    return config_from_hf(hf_config, name=p.name)


# ------------------------------------------------------------------------------------------------ state dicts
def _gpt_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    c = cfg.hidden_size
    out = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"]}
    for i in range(cfg.num_layers):
        h, o = f"h.{i}.", f"layers.{i}."
        # HF's Conv1D stores weights as (in, out): transpose to nn.Linear's (out, in).
        w_qkv, b_qkv = sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[o + f"attn.{name}.weight"] = w_qkv[:, j * c : (j + 1) * c].t()
            out[o + f"attn.{name}.bias"] = b_qkv[j * c : (j + 1) * c]
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            out[o + ours + ".weight"] = sd[h + theirs + ".weight"].t()
            out[o + ours + ".bias"] = sd[h + theirs + ".bias"]
        for ln in ("ln_1", "ln_2"):
            out[o + ln + ".weight"], out[o + ln + ".bias"] = sd[h + ln + ".weight"], sd[h + ln + ".bias"]
    out["ln_f.weight"], out["ln_f.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
    out["lm_head.weight"] = out["wte.weight"]
    return out


def _gpt_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"]}
    for i in range(cfg.num_layers):
        h, o = f"transformer.h.{i}.", f"layers.{i}."
        names = ("q_proj", "k_proj", "v_proj")
        out[h + "attn.c_attn.weight"] = torch.cat([sd[o + f"attn.{n}.weight"] for n in names], dim=0).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[o + f"attn.{n}.bias"] for n in names])
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            out[h + theirs + ".weight"] = sd[o + ours + ".weight"].t()
            out[h + theirs + ".bias"] = sd[o + ours + ".bias"]
        for ln in ("ln_1", "ln_2"):
            out[h + ln + ".weight"], out[h + ln + ".bias"] = sd[o + ln + ".weight"], sd[o + ln + ".bias"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
    out["lm_head.weight"] = sd["wte.weight"]
    return out


# (ours, transformers') names for BERT, per layer and for the rest; weights have the same layout.
_BERT_LAYER = [
    ("attn.q_proj", "attention.self.query"),
    ("attn.k_proj", "attention.self.key"),
    ("attn.v_proj", "attention.self.value"),
    ("attn.o_proj", "attention.output.dense"),
    ("ln_1", "attention.output.LayerNorm"),
    ("mlp.up", "intermediate.dense"),
    ("mlp.down", "output.dense"),
    ("ln_2", "output.LayerNorm"),
]
_BERT_REST = [
    ("word_embeddings", "bert.embeddings.word_embeddings"),
    ("position_embeddings", "bert.embeddings.position_embeddings"),
    ("token_type_embeddings", "bert.embeddings.token_type_embeddings"),
    ("emb_ln", "bert.embeddings.LayerNorm"),
    ("mlm_head.dense", "cls.predictions.transform.dense"),
    ("mlm_head.ln", "cls.predictions.transform.LayerNorm"),
]


def _bert_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = list(_BERT_REST)
    for i in range(cfg.num_layers):
        pairs += [(f"layers.{i}.{a}", f"bert.encoder.layer.{i}.{b}") for a, b in _BERT_LAYER]
    return pairs


def _bert_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs in _bert_pairs(cfg):
        for suffix in (".weight", ".bias"):
            if theirs + suffix in sd:
                out[ours + suffix] = sd[theirs + suffix]
    out["mlm_head.decoder.weight"] = out["word_embeddings.weight"]
    out["mlm_head.decoder.bias"] = sd.get("cls.predictions.decoder.bias", sd.get("cls.predictions.bias"))
    return out


def _bert_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs in _bert_pairs(cfg):
        for suffix in (".weight", ".bias"):
            if ours + suffix in sd:
                out[theirs + suffix] = sd[ours + suffix]
    out["cls.predictions.decoder.weight"] = sd["word_embeddings.weight"]
    out["cls.predictions.bias"] = sd["mlm_head.decoder.bias"]
    out["cls.predictions.decoder.bias"] = sd["mlm_head.decoder.bias"]
    return out


# ------------------------------------------------------------------------------------------------------ API
def from_pretrained(path_or_model: str | os.PathLike | nn.Module, **overrides: Any) -> tuple[nn.Module, ModelConfig]:
    """Our model (and config) with the weights of a transformers GPT2LMHeadModel/BertForMaskedLM.

    `path_or_model` is a local checkpoint directory or a live transformers model. `overrides` replace config fields
    that do not change the weights' shapes (dropout, attn_dropout).
    """
    if isinstance(path_or_model, nn.Module):
        hf_model = path_or_model
        name = getattr(hf_model.config, "name_or_path", "") or "hf"
    else:
        read_checkpoint_config(path_or_model)  # a clear error before transformers gets to complain
        from transformers import BertForMaskedLM, GPT2LMHeadModel

        arch = json.loads((Path(path_or_model) / "config.json").read_text())["model_type"]
        cls = GPT2LMHeadModel if arch == "gpt2" else BertForMaskedLM
        hf_model = cls.from_pretrained(str(path_or_model), local_files_only=True)
        name = Path(path_or_model).name
    cfg = config_from_hf(hf_model.config, name=Path(str(name)).name or "hf")
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    convert = _gpt_from_hf if cfg.arch == "gpt" else _bert_from_hf
    model = build_model(cfg)
    model.load_state_dict(convert(sd, cfg), strict=True)
    return model, cfg


def not_exportable(cfg: ModelConfig) -> str | None:
    """Why transformers cannot hold this model, or None when it can."""
    if cfg.attention != "softmax":
        return f"transformers has no BERT with {cfg.attention} attention"
    return None


def _hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our model's weights under transformers' names (fp32, on the CPU), tied copies included."""
    cfg: ModelConfig = model.config
    if not_exportable(cfg):
        raise ValueError(not_exportable(cfg))
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    return (_gpt_to_hf if cfg.arch == "gpt" else _bert_to_hf)(sd, cfg)


def to_hf(model: nn.Module) -> nn.Module:
    """A transformers model with our model's weights (fp32, on the CPU)."""
    from transformers import BertForMaskedLM, GPT2LMHeadModel

    weights = _hf_state_dict(model)
    cls = GPT2LMHeadModel if model.config.arch == "gpt" else BertForMaskedLM
    hf_model = cls(hf_config_from(model.config))
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    # transformers may keep buffers (position_ids, token_type_ids) that carry no weights.
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion mismatch: missing={missing} unexpected={unexpected}")
    return hf_model.eval()


# Weights transformers ties to others and leaves out of its files (GPT-2's head is the token embedding; BERT's
# decoder is the word embedding and its bias is cls.predictions.bias).
_TIED = {"gpt": ("lm_head.weight",), "bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")}
_HF_CLASS = {"gpt": "GPT2LMHeadModel", "bert": "BertForMaskedLM"}


def save_pretrained(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write `model` (and optionally its tokenizer) as a transformers directory (safetensors, fp32).

    The files are the ones transformers' own `save_pretrained` writes for GPT2LMHeadModel / BertForMaskedLM
    (config.json, generation_config.json for GPT, model.safetensors without the tied copies), written from the
    converted state dict: building the transformers model only to save it would import its modelling code in every
    training process that saves its final weights."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.config
    tensors = {k: v.contiguous() for k, v in _hf_state_dict(model).items() if k not in _TIED[cfg.arch]}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config_from(cfg)
    config.architectures = [_HF_CLASS[cfg.arch]]
    config.save_pretrained(str(out))
    if cfg.arch == "gpt":  # transformers writes one for every model that can generate
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(str(out))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
