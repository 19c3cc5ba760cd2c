"""Dropout under tensor parallelism: each rank's part of the mask one process would draw.

Every tp rank shares one RNG stream. Attention dropout on a rank's own heads and hidden dropout on a rank's own
tokens (`parallel.tp_shard_activations`) draw the mask of the whole tensor and keep their slice, so the ranks' masks
differ where their data differ and the pieces put together equal the single process's dropout exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqpar.models.attention import masked_softmax_attention, sdpa_attention
from seqpar.parallel.tensor import HeadShardedDropoutAttention, TokenShardedDropout


def _qkv(b=2, h=4, t=37, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
def test_masked_softmax_attention_equals_sdpa(causal):
    q, k, v = _qkv()
    pad = torch.ones(2, 37, dtype=torch.bool)
    pad[1, 30:] = False
    for mask in (None, pad):
        want = sdpa_attention(q, k, v, causal=causal, key_padding_mask=mask, dropout_p=0.0)
        got = masked_softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_head_sharded_attention_dropout_is_one_process_dropout_cut_by_heads(causal):
    """Two tp ranks with two heads each, from the same RNG state, give the single process's output with SDPA's
    own dropout (its math kernel on CPU) over four heads: the same mask, cut between the ranks."""
    q, k, v = (x.float() for x in _qkv())
    pad = torch.ones(2, 37, dtype=torch.bool)
    pad[0, 33:] = False
    torch.manual_seed(7)
    want = sdpa_attention(q, k, v, causal=causal, key_padding_mask=pad, dropout_p=0.3)
    parts = []
    for rank in range(2):
        torch.manual_seed(7)
        heads = slice(2 * rank, 2 * rank + 2)
        fn = HeadShardedDropoutAttention(rank, 2)
        parts.append(fn(q[:, heads], k[:, heads], v[:, heads], causal=causal, key_padding_mask=pad, dropout_p=0.3))
    torch.testing.assert_close(torch.cat(parts, dim=1), want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(parts[0], parts[1])
    torch.manual_seed(7)
    no_drop = sdpa_attention(q, k, v, causal=causal, key_padding_mask=pad, dropout_p=0.0)
    assert not torch.allclose(want, no_drop)  # dropout did act


def test_token_sharded_dropout_is_one_process_dropout_cut_by_tokens():
    x = torch.randn(3, 12, 16)
    torch.manual_seed(3)
    want = F.dropout(x, 0.25, training=True)
    parts = []
    for rank in range(4):
        torch.manual_seed(3)
        drop = TokenShardedDropout(0.25, 0, rank, 4).train()  # no key: the shared RNG stream
        parts.append(drop(x[:, 3 * rank : 3 * rank + 3]))
    assert torch.equal(torch.cat(parts, dim=1), want)
    assert torch.equal(TokenShardedDropout(0.25, 0, 0, 4).eval()(x), x)
