"""Hugging Face interop: each model with the transformers classes it matches (GPT <-> GPT2LMHeadModel, BERT <->
BertForMaskedLM, Llama <-> LlamaForCausalLM and, with q/k/v biases, Qwen2ForCausalLM), weights and configs, read
from what the model declares (`cls.hf`, see `interop.py`).

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
from seqpar.models import MODELS, build_model
from seqpar.models.interop import HFInterop
from seqpar.validation.model import validate_model

# transformers' model_type -> (model.arch, its declaration)
_BY_MODEL_TYPE = {hf.model_type: (arch, hf) for arch, cls in MODELS.items() for hf in cls.hf}


def _interop(cfg: ModelConfig) -> HFInterop:
    """The transformers class our model is written as: the first of its declarations that matches its config."""
    return next(hf for hf in MODELS[cfg.arch].hf if hf.matches(cfg))


# ----------------------------------------------------------------------------------------------------- configs
def _unsupported(what: str, fix: str) -> UserError:
    return UserError("model.init_from", f"is a checkpoint with {what}, which seqpar's models do not implement", fix)


def config_from_hf(hf_config: Any, name: str = "hf") -> ModelConfig:
    """Our ModelConfig for a transformers config of a model we have (refusing options our models lack)."""
    if hf_config.model_type not in _BY_MODEL_TYPE:
        raise UserError("model.init_from", f"has model_type={hf_config.model_type!r}",
                        f"use a {', '.join(_BY_MODEL_TYPE)} checkpoint")
    arch, hf = _BY_MODEL_TYPE[hf_config.model_type]
    theirs = getattr(hf_config, hf.activation_field)
    act = hf.activations.get(theirs) if isinstance(theirs, str) else None
    if act is None:
        raise _unsupported(f"{hf.activation_field}={theirs}", f"use a checkpoint with {' or '.join(hf.activations)}")
    problem = hf.unsupported(hf_config)
    if problem is not None:
        raise _unsupported(*problem)
    values = {ours: getattr(hf_config, name_there) for ours, name_there in hf.fields.items()}
    values.update({k: v for k, v in hf.defaults(hf_config).items() if values.get(k) is None})
    values.update(hf.config_values(hf_config))
    cfg = ModelConfig(name=name, arch=arch, activation=act, **values)
    validate_model(cfg)
    return cfg


def hf_config_from(cfg: ModelConfig) -> Any:
    """The transformers config (GPT2Config, BertConfig, ...) equal to our ModelConfig."""
    import transformers

    hf = _interop(cfg)
    kwargs = {theirs: getattr(cfg, ours) for ours, theirs in hf.fields.items()}
    kwargs[hf.activation_field] = hf.activation_out(cfg.activation)
    kwargs.update(hf.extra_config(cfg))
    return getattr(transformers, hf.config_class)(**kwargs, tie_word_embeddings=cfg.tied_embeddings,
                                                  torch_dtype="float32")


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


# ------------------------------------------------------------------------------------------------------ API
def from_pretrained(path_or_model: str | os.PathLike | nn.Module, **overrides: Any) -> tuple[nn.Module, ModelConfig]:
    """Our model (and config) with the weights of a transformers model we match (GPT2LMHeadModel, BertForMaskedLM,
    LlamaForCausalLM, Qwen2ForCausalLM).

    `path_or_model` is a local checkpoint directory or a live transformers model. `overrides` replace config fields
    that do not change the weights' shapes (dropout, attn_dropout).
    """
    if isinstance(path_or_model, nn.Module):
        hf_model = path_or_model
        name = getattr(hf_model.config, "name_or_path", "") or "hf"
    else:
        read_checkpoint_config(path_or_model)  # a clear error before transformers gets to complain
        import transformers

        model_type = json.loads((Path(path_or_model) / "config.json").read_text())["model_type"]
        cls = getattr(transformers, _BY_MODEL_TYPE[model_type][1].model_class)
        hf_model = cls.from_pretrained(str(path_or_model), local_files_only=True)
        name = Path(path_or_model).name
    cfg = config_from_hf(hf_model.config, name=Path(str(name)).name or "hf")
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    model = build_model(cfg)
    model.load_state_dict(_interop(cfg).from_hf(sd, cfg), strict=True)
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
    return _interop(cfg).to_hf(sd, cfg)


def to_hf(model: nn.Module) -> nn.Module:
    """A transformers model with our model's weights (fp32, on the CPU)."""
    import transformers

    weights = _hf_state_dict(model)
    hf_model = getattr(transformers, _interop(model.config).model_class)(hf_config_from(model.config))
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    # transformers may keep buffers (position_ids, token_type_ids) that carry no weights.
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion mismatch: missing={missing} unexpected={unexpected}")
    return hf_model.eval()


def save_pretrained(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write `model` (and optionally its tokenizer) as a transformers directory (safetensors, fp32).

    The files are the ones transformers' own `save_pretrained` writes for the matching class (config.json,
    generation_config.json for a model that generates, model.safetensors without the tied copies), written from the
    converted state dict: building the transformers model only to save it would import its modelling code in every
    training process that saves its final weights."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.config
    hf = _interop(cfg)
    tied = hf.tied if cfg.tied_embeddings else ()
    tensors = {k: v.contiguous() for k, v in _hf_state_dict(model).items() if k not in tied}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config_from(cfg)
    config.architectures = [hf.model_class]
    config.save_pretrained(str(out))
    if hf.generates:  # transformers writes one for every model that can generate
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(str(out))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
