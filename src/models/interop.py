"""What a model declares for transformers interop, as data beside it: `HFInterop`.

Each model class carries `hf`, a tuple of `HFInterop`s (like its `layout`): the transformers classes it matches
(Llama: LlamaForCausalLM, and Qwen2ForCausalLM for its q/k/v-bias variant). `seqpar.models.hf` reads them to convert
configs and weights both ways: a transformers config is read by the declaration of its model_type, and a model is
written as the first declaration that `matches` its config. A model's transformers names live in its own folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFInterop:
    model_type: str  # transformers' config.model_type
    model_class: str  # the transformers class our model matches (a name in `transformers`)
    config_class: str  # its config class
    fields: dict[str, str]  # our ModelConfig field -> the transformers config attribute holding the same value
    activations: dict[str, str]  # transformers' activation name -> ours (what we can read)
    activation_field: str  # the transformers config attribute naming the activation
    unsupported: Callable[[Any], tuple[str, str] | None]  # (what, fix) for a transformers config we cannot hold
    from_hf: Callable[[StateDict, Any], StateDict]  # transformers' weights -> ours (cfg: our ModelConfig)
    to_hf: Callable[[StateDict, Any], StateDict]  # ours -> transformers'
    tied: tuple[str, ...]  # transformers' names of tied weights, left out of its files (when the model ties them)
    extra_config: Callable[[Any], dict[str, Any]] = field(default=lambda cfg: {})  # more transformers config values
    defaults: Callable[[Any], dict[str, Any]] = field(default=lambda hf_config: {})  # our values it may leave unset
    # our config values read from its config other than as one attribute each (Llama's rope_theta, tied head)
    config_values: Callable[[Any], dict[str, Any]] = field(default=lambda hf_config: {})
    matches: Callable[[Any], bool] = field(default=lambda cfg: True)  # whether this class holds our config's model
    generates: bool = False  # transformers writes a generation_config.json for it

    def activation_out(self, ours: str) -> str:
        """transformers' name for our activation (the first that reads back as it)."""
        return next(theirs for theirs, o in self.activations.items() if o == ours)


def rename(sd: StateDict, pairs: list[tuple[str, str, bool]], to_hf: bool) -> StateDict:
    """The `.weight`/`.bias` tensors of `pairs` (our module, transformers' module, whether its weight is stored
    transposed there) renamed from one side's names to the other's."""
    out = {}
    for ours, theirs, transposed in pairs:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        for suffix in (".weight", ".bias"):
            if src + suffix in sd:
                value = sd[src + suffix]
                out[dst + suffix] = value.t() if transposed and suffix == ".weight" else value
    return out
