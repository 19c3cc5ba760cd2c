"""Tiled MLPs (`trainer.tiled_mlp`): the same outputs and gradients as whole ones, alone and under activation
checkpointing, fp32 and bf16; the ffn-wide intermediate exists for one tile at a time."""

from __future__ import annotations

import pytest
import torch

from seqpar.config import ModelConfig
from seqpar.models import build_model
from seqpar.models.layers import Tileable, set_mlp_tiling
from seqpar.parallel.parallelize import apply_activation_checkpointing
from seqpar.trainer.weights import unwrapped_name


def _grads(model, batch, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch)
    out.float().square().mean().backward()
    return out.detach(), {unwrapped_name(n): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("autocast,tol", [(False, 1e-6), (True, 1e-2)])
def test_tiled_mlp_gives_the_same_outputs_and_gradients(arch, checkpointing, autocast, tol):
    cfg = ModelConfig(arch=arch, num_layers=2, hidden_size=32, num_heads=4, vocab_size=97, max_seq_len=64)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 97, (2, 50)), "position_ids": torch.arange(50)}
    results = []
    for tile in (None, 16):  # 50 tokens: tiles of 16, 16, 16 and 2
        torch.manual_seed(1)
        model = build_model(cfg)
        set_mlp_tiling(model, tile)
        if checkpointing:
            apply_activation_checkpointing(model)
        results.append(_grads(model, batch, autocast))
    (out, grads), (ref_out, ref_grads) = results[1], results[0]
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=tol, atol=tol * max(1.0, g.abs().max().item()))


def test_the_intermediate_exists_one_tile_at_a_time(monkeypatch):
    """The activation between up and down is never wider than a tile, in forward or in the backward's recompute."""
    cfg = ModelConfig(arch="gpt", num_layers=1, hidden_size=32, num_heads=4, vocab_size=97, max_seq_len=64)
    model = build_model(cfg)
    set_mlp_tiling(model, 16)
    seen: list[int] = []
    mlp = next(m for m in model.modules() if isinstance(m, Tileable))
    mlp.down.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))  # its input: the act
    model(torch.randint(0, 97, (2, 64)), torch.arange(64)).sum().backward()
    assert seen == [16] * 8  # 4 tiles in forward, 4 recomputed in backward
