"""Model behaviour that parallelism relies on: the attention hook, explicit positions, tied weights, purity."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from seqpar.config import ModelConfig
from seqpar.models import build_model, sdpa_attention, set_core_attention

SRC = Path(__file__).resolve().parents[2] / "src"


def tiny(arch: str, **kw) -> ModelConfig:
    base = dict(name="t", arch=arch, num_layers=2, hidden_size=32, num_heads=4, vocab_size=67, max_seq_len=48)
    return ModelConfig(**{**base, **kw})


def reference_attention(q, k, v, causal, key_padding_mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(scores.shape).clone()
    if key_padding_mask is not None:
        allowed &= key_padding_mask[:, None, None, :]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [True, False])
def test_sdpa_attention_matches_reference(causal, padded):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 13, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = None
    if padded:
        mask = torch.ones(2, 13, dtype=torch.bool)
        mask[1, 9:] = False
    out = sdpa_attention(q, k, v, causal=causal, key_padding_mask=mask, dropout_p=0.0)
    ref = reference_attention(q, k, v, causal, mask)
    assert torch.allclose(out, ref, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_core_attention_is_swappable(arch):
    model = build_model(tiny(arch)).eval()
    calls = []

    def spy(q, k, v, *, causal, key_padding_mask, dropout_p, document_ids):
        calls.append((tuple(q.shape), causal))
        return sdpa_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                              document_ids=document_ids)

    ids = torch.randint(0, 67, (2, 10))
    before = model(ids, torch.arange(10))
    set_core_attention(model, spy)
    after = model(ids, torch.arange(10))
    assert calls == [((2, 4, 10, 8), arch == "gpt")] * 2
    assert torch.equal(before, after)


def test_positions_are_an_input():
    """A causal chunk given its true positions reproduces the matching slice of the whole sequence's logits."""
    torch.manual_seed(0)
    model = build_model(tiny("gpt")).eval()
    ids = torch.randint(0, 67, (2, 20))
    full = model(ids, torch.arange(20))
    prefix = model(ids[:, :12], torch.arange(12))
    assert torch.allclose(full[:, :12], prefix, atol=1e-6)
    shifted = model(ids[:, :12], torch.arange(5, 17))
    assert not torch.allclose(prefix, shifted, atol=1e-3)


def test_bert_padding_does_not_leak():
    torch.manual_seed(0)
    model = build_model(tiny("bert")).eval()
    ids = torch.randint(5, 67, (1, 16))
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[:, 10:] = 0
    a = model(ids, torch.arange(16), mask)
    ids2 = ids.clone()
    ids2[:, 10:] = torch.randint(5, 67, (1, 6))  # change only padded tokens
    b = model(ids2, torch.arange(16), mask)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_head_is_tied_to_embedding(arch):
    model = build_model(tiny(arch))
    emb = model.wte if arch == "gpt" else model.word_embeddings
    head = model.lm_head if arch == "gpt" else model.mlm_head.decoder
    assert head.weight is emb.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_initialisation_is_seeded_and_meta_buildable():
    torch.manual_seed(5)
    a = build_model(tiny("gpt"))
    torch.manual_seed(5)
    b = build_model(tiny("gpt"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    meta = build_model(tiny("bert"), device="meta")
    assert all(p.is_meta for p in meta.parameters())


def test_models_do_not_import_torch_distributed():
    import ast

    for path in (SRC / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("torch.distributed", "seqpar.parallel")), (path, name)


def test_pipeline_layer_split_is_even_and_complete():
    from seqpar.parallel.pipeline import layer_split

    assert [list(r) for r in layer_split(4, 2)] == [[0, 1], [2, 3]]
    assert [len(r) for r in layer_split(7, 3)] == [3, 2, 2]
    assert [i for r in layer_split(24, 8) for i in r] == list(range(24))


def test_linformer_attention_is_attention_over_projected_keys_and_values():
    """model.attention=linformer: softmax(Q (E K)^T / sqrt(d)) (F V) with E, F the layer's (k, max_len) projections
    (first T columns), padded keys and values zeroed before the projection; gradients reach E and F."""
    from seqpar.models.layers import SelfAttention

    cfg = ModelConfig(arch="bert", hidden_size=32, num_heads=4, max_seq_len=64, attention="linformer", linformer_k=8)
    torch.manual_seed(0)
    attn = SelfAttention(cfg)
    torch.nn.init.normal_(attn.proj_k)
    torch.nn.init.normal_(attn.proj_v)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    attn = attn.double()
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[1, 31:] = False
    y = attn(x, pad)

    def heads(t):
        return t.view(2, 40, 4, 8).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    keep = pad[:, None, :, None].double()
    kp, vp = attn.proj_k[:, :40] @ (k * keep), attn.proj_v[:, :40] @ (v * keep)
    want = torch.softmax(q @ kp.transpose(-2, -1) / math.sqrt(8), dim=-1) @ vp
    want = attn.o_proj(want.transpose(1, 2).reshape(2, 40, 32))
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert attn.proj_k.grad[:, :40].abs().sum() > 0 and attn.proj_k.grad[:, 40:].abs().sum() == 0


def test_bert_head_at_target_positions_only_equals_the_full_head():
    """prediction_mask runs the MLM head at the masked positions only: those rows of the full logits, and the
    same summed loss and gradients (the trainer's `model_loss_sum` with targets_only)."""
    from seqpar.data.mlm import IGNORE_INDEX
    from seqpar.trainer.step import model_loss_sum

    cfg = ModelConfig(arch="bert", num_layers=2, hidden_size=32, num_heads=4, vocab_size=97, max_seq_len=16)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, 97, (3, 16))
    labels = torch.where(torch.rand(3, 16) < 0.2, ids, torch.full_like(ids, IGNORE_INDEX))
    labels[1] = IGNORE_INDEX  # a sequence without targets
    micro = {"input_ids": ids, "position_ids": torch.arange(16), "labels": labels}
    mask = labels != IGNORE_INDEX
    full = model(ids, torch.arange(16))
    torch.testing.assert_close(model(ids, torch.arange(16), prediction_mask=mask), full[mask], rtol=1e-5, atol=1e-6)

    grads = []
    for targets_only in (False, True):
        model.zero_grad()
        loss = model_loss_sum(model, micro, torch.device("cpu"), targets_only)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_full, g_full), (loss_sparse, g_sparse) = grads
    torch.testing.assert_close(loss_sparse, loss_full, rtol=1e-6, atol=0)
    for name, g in g_full.items():
        torch.testing.assert_close(g_sparse[name], g, rtol=1e-5, atol=1e-6, msg=name)
