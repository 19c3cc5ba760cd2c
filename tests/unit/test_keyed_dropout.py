"""Hidden dropout drawn per token from (sequence seed, site, global position, feature): the masks of any piece of a
batch (data-parallel share, sequence chunk, token shard, micro-batch, pipeline stage) are the pieces of the whole
batch's masks, and the model with dropout on gives the same output for a batch as for its pieces.
"""

from __future__ import annotations

import pytest
import torch

from seqpar.data.loader import GlobalBatchLoader, dropout_seed
from seqpar.models import build_model
from seqpar.models.dropout import DropoutKey, KeyedDropout, keep_mask, keyed_dropout
from seqpar.parallel.sequence import chunk_indices, shard_batch
from seqpar.parallel.tensor import TokenShardedDropout

from .test_models import tiny

B, T, C = 4, 24, 16


def key(b=B, t=T) -> DropoutKey:
    return DropoutKey(torch.tensor([dropout_seed(0, 0, 0, i) for i in range(b)]), torch.arange(t))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_is_one_minus_p_and_sites_are_independent(p):
    k = key(8, 256)
    a, b = keep_mask(k, 1, 128, p), keep_mask(k, 2, 128, p)
    n = a.numel()
    assert abs(a.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    # Independent sites, positions and features: the agreement of two masks is what independent draws give.
    agree = (a == b).float().mean().item()
    assert abs(agree - ((1 - p) ** 2 + p**2)) < 0.01
    assert not torch.equal(a[:, 0], a[:, 1])  # neighbouring tokens differ
    assert not torch.equal(a[0], a[1])  # sequences differ


def test_pieces_of_a_batch_draw_the_pieces_of_its_mask():
    k, whole = key(), keep_mask(key(), 5, C, 0.3)
    for rank in range(3):  # zigzag sequence chunks of sp=3, as shard_batch cuts them
        idx = chunk_indices(T, 3, rank, zigzag=True)
        assert torch.equal(keep_mask(DropoutKey(k.seeds, k.positions[idx]), 5, C, 0.3), whole[:, idx])
    assert torch.equal(keep_mask(DropoutKey(k.seeds[1:3], k.positions), 5, C, 0.3), whole[1:3])  # dp share
    assert torch.equal(keep_mask(k.tokens(6, 6), 5, C, 0.3), whole[:, 6:12])  # a tp token shard


def test_dropout_scales_kept_elements_and_backward_uses_the_same_mask():
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    y = keyed_dropout(x, key(), 3, 0.25)
    keep = keep_mask(key(), 3, C, 0.25)
    torch.testing.assert_close(y, torch.where(keep, x * (1 / 0.75), 0.0), rtol=0, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, keep.double() * (1 / 0.75), rtol=0, atol=0)


def test_module_is_identity_in_eval_and_torch_dropout_without_a_key():
    x = torch.randn(B, T, C)
    drop = KeyedDropout(0.5, site=1)
    assert torch.equal(drop.eval()(x, key()), x)
    drop.train()
    torch.manual_seed(0)
    y = drop(x)
    torch.manual_seed(0)
    assert torch.equal(y, torch.nn.functional.dropout(x, 0.5, training=True))


def test_token_sharded_dropout_draws_its_tokens_part():
    x = torch.randn(B, T, C)
    want = KeyedDropout(0.2, site=7).train()(x, key())
    parts = [TokenShardedDropout(0.2, 7, r, 4).train()(x[:, 6 * r : 6 * r + 6], key()) for r in range(4)]
    assert torch.equal(torch.cat(parts, dim=1), want)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_model_with_dropout_gives_a_sequence_the_same_output_in_any_batch_piece(arch):
    """The model's hidden dropout (embeddings and both residual branches of every block) is a function of the
    sequence's seed and the positions only: a sub-batch gives the same logits as the whole batch."""
    torch.manual_seed(0)
    model = build_model(tiny(arch, dropout=0.3)).train()
    ids = torch.randint(5, 60, (B, T))
    seeds = key().seeds
    whole = model(ids, torch.arange(T), dropout_seed=seeds)
    part = model(ids[2:], torch.arange(T), dropout_seed=seeds[2:])
    torch.testing.assert_close(part, whole[2:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(whole, model.eval()(ids, torch.arange(T)))  # dropout did act


def test_loader_gives_each_slot_of_a_global_batch_its_seed_in_every_layout():
    data = list(range(64))

    class Dataset:
        def __len__(self):
            return len(data)

        def get(self, i, epoch=0):
            import numpy as np

            return {"input_ids": np.full(T, i, dtype=np.int64)}

    whole = next(GlobalBatchLoader(Dataset(), 8, seed=3))
    shares = [next(GlobalBatchLoader(Dataset(), 8, r, 2, seed=3)) for r in range(2)]
    assert torch.equal(torch.cat([s["dropout_seed"] for s in shares]), whole["dropout_seed"])
    assert len(set(whole["dropout_seed"].tolist())) == 8
    loader = GlobalBatchLoader(Dataset(), 8, seed=3)
    next(loader)
    assert not torch.equal(next(loader)["dropout_seed"], whole["dropout_seed"])  # a new draw each step
    sharded = shard_batch({**whole, "position_ids": torch.arange(T).expand(8, T)}, 2, 1, zigzag=True)
    assert torch.equal(sharded["dropout_seed"], whole["dropout_seed"])  # per sequence: not cut by sp
