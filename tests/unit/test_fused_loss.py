"""The loss that never builds the logits (`seqpar.trainer.loss.linear_loss_sum` / `output_loss_sum`) against the
output layer followed by the logits' loss: value and gradients (features, weight, bias), fp32 and bf16 autocast,
ignored tokens, several slabs; vocabulary-parallel over a tp group of 2 and 3 gloo ranks, with the features whole
or in token shards; and the models' `head_features_only` forward."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.config import ModelConfig
from seqpar.models import build_model
from seqpar.parallel.comm import gather_along
from seqpar.trainer import loss as loss_module
from seqpar.trainer.loss import linear_loss_sum, loss_sum

from ..distributed.spawn import spawn


def _case(n: int = 41, hidden: int = 16, vocab: int = 60, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g)
    b = torch.randn(vocab, generator=g) if bias else None
    labels = torch.randint(0, vocab, (2, n), generator=g)
    labels[:, ::4] = -100
    return x, w, b, labels


def _run(fn, x, w, b, labels, autocast_dtype=None):
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = fn(*leaves[:2], leaves[2] if b is not None else None, labels)
    (loss * 0.25).backward()  # an incoming gradient other than 1
    return [loss.detach().float()] + [t.grad for t in leaves]


def _logits_path(x, w, b, labels):
    return loss_sum(F.linear(x, w, b), labels)


@pytest.mark.parametrize("autocast_dtype,tol", [(None, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("slab_elements", [2**24, 60 * 7])  # one slab; slabs of 7 rows (the last one shorter)
def test_fused_loss_and_gradients_match_the_logits_path(monkeypatch, autocast_dtype, tol, bias, slab_elements):
    monkeypatch.setitem(loss_module.LINEAR_SLAB_ELEMENTS, "cpu", slab_elements)
    monkeypatch.setattr(loss_module, "LINEAR_SLAB_MIN_ROWS", 1)
    case = _case(bias=bias)
    ours = _run(linear_loss_sum, *case, autocast_dtype=autocast_dtype)
    ref = _run(_logits_path, *case, autocast_dtype=autocast_dtype)
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.float(), r.float(), rtol=tol, atol=tol * max(1.0, r.abs().max().item()))


def test_slabs_hold_the_device_slab_of_logits_and_never_fewer_than_the_minimum_rows():
    """GPT-2's vocabulary in 16 MiB on CPU would be 83 rows a slab: the minimum holds it at 256; a small vocabulary
    and a GPU's 256 MiB give more rows than the minimum."""
    assert loss_module.linear_slab_rows(50257, "cpu") == loss_module.LINEAR_SLAB_MIN_ROWS == 256
    assert loss_module.linear_slab_rows(1000, "cpu") == 2**22 // 1000
    assert loss_module.linear_slab_rows(50257, "cuda") == 2**26 // 50257
    assert loss_module.linear_slab_rows(128256, "cuda") == 523  # Llama 3's vocabulary


def test_a_bf16_share_is_added_in_rows_as_a_whole_add_would(monkeypatch):
    """The fp32 weight gradient takes a slab's bf16 share in rows of SLAB_ELEMENTS on CPU (10 rows of 6 here, the
    last one shorter): the same values as one add_."""
    monkeypatch.setitem(loss_module.SLAB_ELEMENTS, "cpu", 60)
    g = torch.Generator().manual_seed(3)
    total, part = torch.randn(57, 6, generator=g), torch.randn(57, 6, generator=g).bfloat16()
    expected = total + part.float()
    loss_module._add_into(total, part)
    assert torch.equal(total, expected)


def test_no_target_token_gives_zero_and_zero_gradients():
    x, w, b, labels = _case()
    loss, gx, gw, gb = _run(linear_loss_sum, x, w, b, torch.full_like(labels, -100))
    assert loss.item() == 0 and not gx.any() and not gw.any() and not gb.any()


def _vocab_parallel(rank, world, token_shards):
    x, w, b, labels = _case(n=42)  # 42 tokens: 14 per rank of 3, 21 per rank of 2
    ref = _run(_logits_path, x, w, b, labels)
    rows = w.shape[0] // world
    mine = slice(rank * rows, (rank + 1) * rows)
    xs = x.clone().requires_grad_()
    ws, bs = w[mine].clone().requires_grad_(), b[mine].clone().requires_grad_()
    features = xs
    if token_shards:  # this rank's tokens only, as activation sharding leaves them; gathered as output_loss_sum does
        tokens = x.shape[1] // world
        part = xs[:, rank * tokens:(rank + 1) * tokens]
        features = gather_along(part, dist.group.WORLD, dim=1)
    loss = linear_loss_sum(features, ws, bs, labels, dist.group.WORLD, vocab_start=rank * rows,
                           partial_features_grad=token_shards)
    (loss * 0.25).backward()
    torch.testing.assert_close(loss.detach(), ref[0], rtol=1e-5, atol=1e-4)
    grad_x = xs.grad
    if token_shards:  # each rank holds its tokens' gradient: summed over ranks, the whole one
        dist.all_reduce(grad_x)
    torch.testing.assert_close(grad_x, ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ws.grad, ref[2][mine], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bs.grad, ref[3][mine], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world,token_shards", [(2, False), (3, False), (2, True)])
def test_vocabulary_parallel_fused_loss_matches_one_process(world, token_shards):
    spawn(_vocab_parallel, world, token_shards)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_head_features_then_the_output_layer_are_the_logits(arch):
    cfg = ModelConfig(arch=arch, num_layers=1, hidden_size=32, num_heads=4, vocab_size=97, max_seq_len=16)
    model = build_model(cfg).eval()
    batch = {"input_ids": torch.randint(0, 97, (2, 16)), "position_ids": torch.arange(16)}
    features = model(**batch, head_features_only=True)
    assert features.shape == (2, 16, 32)
    torch.testing.assert_close(model.output_layer(features), model(**batch))
