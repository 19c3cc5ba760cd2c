"""The document-masking oracle: a packed window with `data.document_mask` gives every token the loss that
transformers' own model (LlamaForCausalLM, GPT2LMHeadModel) gives it when each document of the window runs alone, at
the same weights (`seqpar.models.hf.to_hf`), on one process and under every sp_impl at sp = 2, 3 and 4 (fp32).

The window comes from `PackedSequences` as training reads it: documents of odd lengths joined by the end-of-text
token, positions restarting at each document, the end-of-text token in the document it ends (so its own
document's run predicts the next document's first token, the window's label there)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.config import ModelConfig
from seqpar.data.sequences import PackedSequences, pack_stream
from seqpar.models import build_model, set_core_attention
from seqpar.models.hf import to_hf
from seqpar.parallel.sequence import IMPLS, chunk_indices, sequence_attention, shard_batch, shard_sequence
from seqpar.parallel.sequence.ring_blocks import document_pieces

from .spawn import spawn

TOL = 1e-5  # per-token loss, fp32
EOS = 0
SEQ_LEN = 48  # divisible by 2 * sp for sp = 2, 3, 4
DOC_LENGTHS = [5, 1, 13, 2, 7, 3, 9, 1, 11, 17, 3, 6, 19, 2]  # tokens before each document's end-of-text token


def config(arch: str) -> ModelConfig:
    # 12 heads: ulysses needs them divisible by sp = 2, 3, 4
    common = dict(name="t", arch=arch, num_layers=2, hidden_size=48, num_heads=12, vocab_size=97, max_seq_len=64)
    if arch == "llama":
        return ModelConfig(**common, num_kv_heads=2, ffn_hidden_size=88, activation="silu", layer_norm_eps=1e-6)
    return ModelConfig(**common, ffn_hidden_size=96)


def model(arch: str):
    torch.manual_seed(0)
    m = build_model(config(arch)).eval()
    with torch.no_grad():  # away from the init's zero biases and unit norms, so every weight matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def windows() -> dict[str, torch.Tensor]:
    """Two windows of the packed stream (the second starting inside a document), as the loader collates them."""
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 97, (n,), generator=g).tolist() for n in DOC_LENGTHS]
    seqs = PackedSequences(pack_stream(docs, EOS), SEQ_LEN, EOS, mask_documents=True, restart_positions=True)
    examples = [seqs.get(i) for i in range(2)]
    return {k: torch.stack([torch.from_numpy(e[k]) for e in examples]) for k in examples[0]}


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="none").view(labels.shape)


def oracle(ours_model, batch) -> torch.Tensor:
    """(B, T) losses of each document of each window run alone through transformers' model."""
    hf = to_hf(ours_model).eval()
    out = torch.empty(batch["labels"].shape)
    with torch.no_grad():
        for row, (ids, labels, docs) in enumerate(zip(batch["input_ids"], batch["labels"], batch["document_ids"],
                                                      strict=True)):
            for d in docs.unique():
                where = docs == d
                logits = hf(input_ids=ids[where][None]).logits[0]
                out[row, where] = per_token_loss(logits, labels[where])
    return out


def ours(m, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = m(batch["input_ids"], batch["position_ids"], document_ids=batch["document_ids"])
    return per_token_loss(logits, batch["labels"])


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_one_process_equals_each_document_alone_in_transformers(arch):
    m, batch = model(arch), windows()
    assert batch["document_ids"][0].max() > 3 and batch["position_ids"][1, 0] == 0  # several documents; restarted
    torch.testing.assert_close(ours(m, batch), oracle(m, batch), atol=TOL, rtol=0)


def _sequence_parallel(rank, world, arch):
    m, batch = model(arch), windows()
    want = oracle(m, batch)[:, chunk_indices(SEQ_LEN, world, rank, zigzag=True)]
    local = shard_batch(batch, world, rank, zigzag=True)
    for impl in IMPLS:
        set_core_attention(m, sequence_attention(impl, dist.group.WORLD))
        torch.testing.assert_close(ours(m, local), want, atol=TOL, rtol=0, msg=lambda e, i=impl: f"{i} sp={world}: {e}")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sequence_parallel_equals_each_document_alone_in_transformers(world):
    """ring, rsa and ulysses on this rank's zigzag chunk, Llama and GPT, against the oracle's losses there."""
    for arch in ("llama", "gpt"):
        spawn(_sequence_parallel, world, arch, timeout=180)


# --------------------------------------------------------------------------- ring skips what no document spans
def _short_documents(seq_len: int, length: int) -> torch.Tensor:
    """(2, seq_len) ids of documents of `length` tokens, the second row shifted by 2 so documents straddle chunks
    differently."""
    pos = torch.arange(seq_len)
    return torch.stack([pos // length, (pos + 2) // length])


@pytest.mark.parametrize("sp,length,tile", [(4, 5, None), (3, 7, None), (2, 3, None), (4, 5, 3), (2, 11, 3)])
def test_ring_computes_exactly_the_chunk_pairs_that_share_a_document(sp, length, tile):
    """`document_pieces` keeps a zigzag chunk pair (tile pair, with tiles smaller than chunks) iff some row has a
    document in both, and its trimmed pieces cover every (query, key) pair that causal document masking allows."""
    seq_len = 2 * sp * 8
    docs = _short_documents(seq_len, length)
    chunks = [shard_sequence(docs, sp, r, True) for r in range(sp)]
    position = [chunk_indices(seq_len, sp, r, zigzag=True) for r in range(sp)]
    covered = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    kept = 0
    for r in range(sp):
        for src in range(sp):
            for qs, ks, _ in document_pieces(r, src, True, chunks, tile):
                covered[position[r][qs][:, None], position[src][ks][None, :]] = True
                kept += 1
    allowed = ((docs[:, :, None] == docs[:, None, :]) & torch.ones(seq_len, seq_len, dtype=torch.bool).tril()).any(0)
    assert not (allowed & ~covered).any()  # nothing a document needs is skipped
    assert covered.sum() < allowed.numel() / 2  # under the causal half of the scores that ring without documents computes
    if tile is not None:
        return
    c = seq_len // (2 * sp)
    blocks = {(i, j) for i in range(2 * sp) for j in range(i + 1)
              if (docs[:, i * c:(i + 1) * c, None] == docs[:, None, j * c:(j + 1) * c]).any()}
    # documents shorter than a chunk: the 2sp diagonal pairs and at most the 2sp - 1 neighbours, of the sp(2sp + 1)
    # causal chunk pairs
    assert kept == len(blocks) <= 4 * sp - 1


def _count_kernel_calls(rank, world):
    from seqpar.parallel.sequence import ring

    calls = []
    forward = ring.block_forward
    ring.block_forward = lambda q, *a: calls.append(q.shape[-2]) or forward(q, *a)
    seq_len, h, d = 2 * world * 8, 2, 8
    docs = _short_documents(seq_len, 5)
    local = [shard_sequence(docs, world, r, True) for r in range(world)]
    q = torch.randn(2, h, seq_len // world, d)
    attn = IMPLS["ring"](dist.group.WORLD)
    attn(q, q, q, causal=True, key_padding_mask=None, dropout_p=0.0, document_ids=local[rank])
    planned = sum(len(document_pieces(rank, src, True, local)) for src in range(world))
    assert len(calls) == planned < 2 * world, (calls, planned)  # fewer than the blocks' 2 chunk pairs each
    calls.clear()
    attn(q, q, q, causal=True, key_padding_mask=None, dropout_p=0.0, document_ids=None)
    assert len(calls) == world  # without documents: one call per block
    ring.block_forward = forward


def test_ring_calls_its_kernel_only_for_the_planned_pieces():
    spawn(_count_kernel_calls, 4, timeout=120)
