"""Tensor parallelism at layer level over gloo: sharded layers against slices of the single-device weights,
vocab-parallel cross-entropy against F.cross_entropy, and layout-independent initialisation; with more tp ranks than
key/value heads, each rank's copy of the head its query heads use."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from seqpar.config import ModelConfig, ParallelConfig
from seqpar.models import MODELS, build_model
from seqpar.parallel.data_parallel import clip_grad_norm, match_grad_placements
from seqpar.parallel.mesh import ParallelMesh
from seqpar.parallel.tensor import apply_tensor_parallel, loss_context

from .spawn import spawn

ATOL = 1e-5


def _config(arch: str, kv_heads: int = 2) -> ModelConfig:
    """Two layers, 4 heads; Llama with 2 key/value heads (grouped-query attention) and an untied head."""
    extra = {"num_kv_heads": kv_heads, "activation": "silu", "qkv_bias": True} if arch == "llama" else {}
    return ModelConfig(arch=arch, num_layers=2, hidden_size=32, num_heads=4, vocab_size=96, max_seq_len=16, **extra)


def _check(rank, world, arch, kv_heads=2):
    cfg = _config(arch, kv_heads)
    torch.manual_seed(0)
    ref = build_model(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    mesh = ParallelMesh.from_config(ParallelConfig(tp=world), torch.device("cpu"))
    apply_tensor_parallel(model, mesh.device_mesh["tp"])

    # Initialisation does not depend on the layout: each shard is the matching slice of the full weight.
    full = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.full_tensor() if hasattr(p, "full_tensor") else p, full[name]), name
    for head, emb in model.layout.tied.items():
        assert model.get_parameter(head) is model.get_parameter(emb), "the output layer is no longer tied"

    # Column-parallel q_proj gives this rank's slice of the outputs (its heads); row-parallel o_proj the full sum.
    x = torch.randn(2, 8, 32)
    attn, ref_attn = model.layers[0].attn, ref.layers[0].attn
    cols = slice(rank * 32 // world, (rank + 1) * 32 // world)
    torch.testing.assert_close(attn.q_proj(x), ref_attn.q_proj(x)[..., cols], atol=ATOL, rtol=0)
    # Key/value heads are sharded the same way (fewer of them under GQA); with more ranks than heads each rank holds
    # the one its query heads use, head rank // (world / kv_heads).
    kv, held = cfg.kv_heads, max(cfg.kv_heads // world, 1)
    first = rank * kv // world
    kv_cols = slice(first * cfg.head_dim, (first + held) * cfg.head_dim)
    torch.testing.assert_close(attn.k_proj(x), ref_attn.k_proj(x)[..., kv_cols], atol=ATOL, rtol=0)
    torch.testing.assert_close(attn.v_proj(x), ref_attn.v_proj(x)[..., kv_cols], atol=ATOL, rtol=0)
    y = torch.randn(2, 8, 32)
    torch.testing.assert_close(attn.o_proj(y[..., cols]), ref_attn.o_proj(y), atol=ATOL, rtol=0)

    # Vocab-parallel cross-entropy over sharded logits equals F.cross_entropy over full logits, fwd and bwd.
    ids = torch.randint(0, 96, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    labels = torch.where(torch.rand(2, 8) < 0.5, ids, -100)
    logits = model(ids, pos)
    assert tuple(logits.to_local().shape) == (2, 8, 96 // world)  # never the full vocabulary on one rank
    with loss_context(world):
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        loss.backward()
    ref_loss = F.cross_entropy(ref(ids, pos).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    ref_loss.backward()
    torch.testing.assert_close(loss.full_tensor(), ref_loss, atol=ATOL, rtol=1e-6)
    match_grad_placements(list(model.parameters()))  # as the engine does: e.g. key/value copies' gradients summed
    for name, p in model.named_parameters():
        if hasattr(p.grad, "to_local"):  # this rank's gradient is its part of the whole one
            assert p.grad.placements == p.placements, name
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(g, full[name].grad, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # The global gradient norm counts every shard once and every replicated gradient once.
    norm = clip_grad_norm(list(model.parameters()), float("inf"), mesh.group("tp"))
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))
    torch.testing.assert_close(norm, ref_norm, atol=ATOL, rtol=1e-6)


@pytest.mark.parametrize("arch", ["gpt", "bert", "llama"])
def test_tensor_parallel_layers_loss_and_init(arch):
    spawn(_check, 2, arch)


def _replicated_key_value_heads(rank, world):
    for kv_heads in (1, 2):
        _check(rank, world, "llama", kv_heads)


def test_tensor_parallel_beyond_the_key_value_heads():
    """tp=4 with 1 and 2 key/value heads: each rank's k_proj/v_proj are its query heads' head (with its bias), the
    gradients of the copies summed, the global norm counting each head once."""
    spawn(_replicated_key_value_heads, 4)


def test_the_plan_without_activation_sharding_shards_only_the_matmuls():
    block = {"layers.*.attn.q_proj": "colwise", "layers.*.attn.k_proj": "kv_colwise",
             "layers.*.attn.v_proj": "kv_colwise",
             "layers.*.attn.o_proj": "rowwise", "layers.*.mlp.up": "colwise", "layers.*.mlp.down": "rowwise"}
    assert MODELS["gpt"].layout.tp_styles(False) == {"wte": "vocab_embedding", **block, "lm_head": "vocab_head"}
    assert MODELS["bert"].layout.tp_styles(False) == {"word_embeddings": "vocab_embedding", **block,
                                                      "mlm_head.decoder": "vocab_head"}
    assert MODELS["gpt"].layout.tp_styles(True) == MODELS["gpt"].layout.tp_plan


def test_layouts_name_real_modules_and_parameters():
    configs = [_config(arch) for arch in MODELS] + [dataclasses.replace(_config("llama"), tie_embeddings=True)]
    for cfg in configs:
        arch, model = cfg.arch, build_model(cfg)
        names = {n for n, _ in model.named_modules()}
        layout = model.layout
        for pattern in layout.tp_plan:
            assert any(n == pattern.replace("*", "0") for n in names), (arch, pattern)
        for name in [*layout.embedding, *layout.head, *layout.token_sharded_outputs]:
            assert name in names, (arch, name)
        params = dict(model.named_parameters(remove_duplicate=False))
        for name in [*layout.tied, *layout.tied.values(), *layout.position_params]:
            assert name in params, (arch, name)
        # Everything outside `layers` is the embedding's (first pipeline stage) or the head's (last).
        top = {n.split(".")[0] for n in params if not n.startswith("layers.")}
        assert top == set(layout.embedding) | set(layout.head), (arch, top)
