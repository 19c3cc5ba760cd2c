"""Activation checkpointing with the block inputs offloaded to host memory (`trainer.activation_checkpointing=offload`).

On CPU there is no device memory to save, so these tests check the logic: the tensors moved to the host are exactly
the blocks' saved inputs, and the gradients equal those of plain checkpointing and of no checkpointing.
"""

from __future__ import annotations

import contextlib
import importlib
import math

import pytest
import torch

from seqpar.config import ModelConfig
from seqpar.models import build_model
from seqpar.parallel.parallelize import apply_activation_checkpointing
from seqpar.trainer.weights import unwrapped_name

parallelize = importlib.import_module("seqpar.parallel.parallelize")


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).float().square().mean().backward()
    return {unwrapped_name(n): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_offloaded_checkpointing_moves_block_inputs_to_the_host_and_keeps_the_gradients(arch, monkeypatch):
    cfg = ModelConfig(arch=arch, num_layers=3, hidden_size=32, num_heads=4, vocab_size=97, max_seq_len=24)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 97, (2, 24)), "position_ids": torch.arange(24)}
    if arch == "bert":
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[1, 17:] = 0
        batch["attention_mask"] = mask
    models = {}
    for kind in ("none", "checkpoint", "offload"):
        torch.manual_seed(1)
        models[kind] = build_model(cfg)
        if kind != "none":
            apply_activation_checkpointing(models[kind], offload=kind == "offload")

    packed: list[tuple[int, ...]] = []

    @contextlib.contextmanager
    def recording(pin_memory=False):  # the host copies that save_on_cpu would make, made and recorded here
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t.cpu().clone(),
                                                      lambda t: t):
            yield

    monkeypatch.setattr(parallelize, "save_on_cpu", recording)
    grads = {kind: _grads(m, batch) for kind, m in models.items()}
    hidden = (2, 24, 32)
    # Each block's forward saves its tensor inputs for the recomputation, nothing else: the hidden states, the
    # positions (rotary models read them) and BERT's padding mask (torch 2.11's checkpoint also saves an empty
    # placeholder a block, which holds no memory).
    per_block = [hidden, (24,), (2, 24)] if arch == "bert" else [hidden, (24,)]
    assert sorted(s for s in packed if math.prod(s)) == sorted(per_block * cfg.num_layers)
    for kind in ("checkpoint", "offload"):
        assert grads[kind].keys() == grads["none"].keys()
        for name, g in grads["none"].items():
            torch.testing.assert_close(grads[kind][name], g, rtol=0, atol=1e-6)
