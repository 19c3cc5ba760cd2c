"""Tokenizers, packing, MLM masking and the loader: the properties training and parallelism rely on."""

from __future__ import annotations

import numpy as np
import pytest

from seqpar.config import Config, DataConfig, ModelConfig, TrainerConfig, data_view
from seqpar.data.corpus import builtin_corpus_file, builtin_documents, resolve_text_files
from seqpar.data.loader import GlobalBatchLoader, permutation
from seqpar.data.mlm import IGNORE_INDEX, example_rng, mlm_mask
from seqpar.data.sequences import (
    MLMSequences,
    PackedSequences,
    build_sequences,
    document_layout,
    pack_stream,
    pack_windows,
)
from seqpar.errors import UserError

TEXT = "Return the number of items in a container.\n\nThe ring passes keys and values, chunk by chunk."


@pytest.fixture(scope="module")
def data(cache_dir):
    out = {}
    for arch in ("gpt", "bert"):
        cfg = Config(
            model=ModelConfig(arch=arch, vocab_size=2048, max_seq_len=64),
            data=DataConfig(seq_len=64, cache_dir=str(cache_dir)),
            trainer=TrainerConfig(global_batch_size=8, seed=7),
        )
        out[arch] = build_sequences(cfg)
    return out


def test_builtin_corpus_is_real_english_and_cached(cache_dir):
    docs = builtin_documents()
    assert len(docs) > 1000 and sum(map(len, docs)) > 1_500_000
    words = " ".join(docs[:200]).lower().split()
    assert sum(w in {"the", "of", "and", "a", "is", "to"} for w in words) / len(words) > 0.08
    path = builtin_corpus_file(DataConfig(cache_dir=str(cache_dir)))
    assert path.stat().st_size > 1_500_000


def test_builtin_corpus_fingerprint_follows_its_contents_not_its_file(tmp_path):
    """Prepared caches are keyed by the source's fingerprint: a rewritten built-in corpus file with the same text
    (another job on a shared cache, a copied cache) keeps it, so no job prepares (and trains a tokenizer) again."""
    import os

    from seqpar.data.prepared.sources import source_fingerprint

    cfg = DataConfig(cache_dir=str(tmp_path))
    first = source_fingerprint(cfg)
    path = builtin_corpus_file(cfg)
    text = path.read_bytes()
    path.unlink()
    path.write_bytes(text)
    os.utime(path, (1, 1))
    assert source_fingerprint(cfg) == first


def test_gpt_tokenizer_round_trips(data):
    tok = data["gpt"].tokenizer
    assert len(tok) == 2048 and tok.eos_token_id is not None
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT) / 2.5  # a real subword vocabulary, not bytes


def test_bert_tokenizer_has_specials(data):
    tok = data["bert"].tokenizer
    assert {tok.pad_token, tok.cls_token, tok.sep_token, tok.mask_token} == {"[PAD]", "[CLS]", "[SEP]", "[MASK]"}
    enc = tok(TEXT)["input_ids"]
    assert enc[0] == tok.cls_token_id and enc[-1] == tok.sep_token_id
    assert tok.unk_token_id not in enc


def test_document_ids_and_positions_restart_after_each_end_of_text():
    # a window starting inside a document: 7 8 <eos> | 1 <eos> | 4 5 6 <eos> | 9
    ids, positions = document_layout(np.array([7, 8, 0, 1, 0, 4, 5, 6, 0, 9]), eos_id=0)
    assert ids.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]  # the end-of-text token belongs to the document it ends
    assert positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 0]


def test_packed_examples_carry_document_ids_with_document_masking():
    stream = pack_stream([[5, 6, 7], [8], [9, 10, 11, 12]], eos_id=0)  # 5 6 7 0 8 0 9 10 11 12 0
    masked = PackedSequences(stream, 8, eos_id=0, mask_documents=True, restart_positions=True).get(0)
    assert masked["document_ids"].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert masked["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
    assert masked["labels"].tolist() == stream[1:9].tolist()  # every token keeps its target
    continued = PackedSequences(stream, 8, eos_id=0, mask_documents=True).get(0)
    assert continued["position_ids"].tolist() == list(range(8))
    assert "document_ids" not in PackedSequences(stream, 8).get(0)


@pytest.mark.parametrize("arch,mask,positions", [("llama", True, "restart"), ("gpt", False, "continue")])
def test_document_masking_defaults_on_for_llama(arch, mask, positions):
    d = data_view(Config(model=ModelConfig(arch=arch))).data
    assert (d.document_mask, d.document_positions) == (mask, positions)
    d = data_view(Config(model=ModelConfig(arch=arch), data=DataConfig(document_mask=not mask))).data
    assert (d.document_mask, d.document_positions) == (not mask, "restart" if not mask else "continue")


def test_gpt_packing_labels_are_next_tokens():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    stream = pack_stream(docs, eos_id=0)
    assert stream.tolist() == [5, 6, 7, 0, 8, 0, 9, 10, 11, 12, 13, 0]
    seqs = PackedSequences(stream, seq_len=4)
    assert len(seqs) == 2  # (12 - 1) // 4
    for i in range(len(seqs)):
        ex = seqs.get(i)
        assert ex["input_ids"].tolist() == stream[i * 4 : i * 4 + 4].tolist()
        assert ex["labels"].tolist() == stream[i * 4 + 1 : i * 4 + 5].tolist()  # last position has a target too
        assert ex["position_ids"].tolist() == [0, 1, 2, 3]


def test_bert_windows_frame_pad_and_keep_every_token():
    docs = [[10, 11], [12, 13, 14], list(range(20, 31)), [40]]
    windows, lengths = pack_windows(docs, seq_len=8, cls_id=2, sep_id=3, pad_id=0)
    body_tokens = []
    for w, n in zip(windows, lengths, strict=True):
        assert w[0] == 2 and w[n - 1] == 3 and (w[n:] == 0).all() and n <= 8
        body_tokens += w[1 : n - 1].tolist()
    assert body_tokens == [t for d in docs for t in d]  # nothing lost, order kept


def test_mlm_masking_rates_and_labels():
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 1000, size=20000)
    maskable = np.ones_like(ids, dtype=bool)
    maskable[:100] = False
    out, labels = mlm_mask(ids, maskable, np.random.default_rng(1), mask_id=4, random_ids=np.arange(10, 1000))
    chosen = labels != IGNORE_INDEX
    assert chosen.sum() == round(0.15 * maskable.sum())
    assert not chosen[:100].any()
    assert (labels[chosen] == ids[chosen]).all()
    assert (out[~chosen] == ids[~chosen]).all()
    masked = (out[chosen] == 4).mean()
    kept = (out[chosen] == ids[chosen]).mean()
    assert abs(masked - 0.8) < 0.02 and 0.08 < kept < 0.12 + 0.01  # random replacements can hit the same id


def test_mlm_is_deterministic_and_spares_specials(data):
    seqs: MLMSequences = data["bert"].train
    tok = data["bert"].tokenizer
    a, b = seqs.get(3, epoch=0), seqs.get(3, epoch=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["labels"], seqs.get(3, epoch=1)["labels"])  # fresh masking each epoch
    ex = seqs.get(0)
    real = ex["attention_mask"].astype(bool)
    specials = np.isin(seqs.windows[0], [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id])
    assert (ex["labels"][specials] == IGNORE_INDEX).all()
    assert (ex["labels"][~real] == IGNORE_INDEX).all()
    assert (ex["labels"] != IGNORE_INDEX).sum() == max(1, round(0.15 * (real & ~specials).sum()))
    assert (example_rng(1, 2, 3).random(4) == example_rng(1, 2, 3).random(4)).all()


def test_train_and_val_are_disjoint(data):
    d = data["gpt"]
    assert len(d.train) > 50 and len(d.val) > 0
    train_text = set(map(tuple, (d.train.get(i)["input_ids"][:16] for i in range(len(d.train)))))
    assert not any(tuple(d.val.get(i)["input_ids"][:16]) in train_text for i in range(len(d.val)))


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_loader_shares_cover_the_global_batch(data, dp):
    seqs = data["gpt"].train
    full = GlobalBatchLoader(seqs, 8, seed=3)
    parts = [GlobalBatchLoader(seqs, 8, dp_rank=r, dp_size=dp, seed=3) for r in range(dp)]
    for _ in range(3):
        whole = next(full)
        shares = [next(p) for p in parts]
        assert all(s["input_ids"].shape == (8 // dp, 64) for s in shares)
        assert np.array_equal(np.concatenate([s["input_ids"] for s in shares]), whole["input_ids"])


def test_loader_is_deterministic_and_resumes(data):
    seqs = data["bert"].train
    a = GlobalBatchLoader(seqs, 8, seed=11)
    first = [next(a) for _ in range(a.steps_per_epoch + 3)]  # crosses an epoch boundary
    b = GlobalBatchLoader(seqs, 8, seed=11)
    for batch in first:
        nxt = next(b)
        assert all(np.array_equal(batch[k], nxt[k]) for k in batch)
    c = GlobalBatchLoader(seqs, 8, seed=11)
    for _ in range(5):
        next(c)
    state = c.state_dict()
    d = GlobalBatchLoader(seqs, 8, seed=11)
    d.load_state_dict(state)
    for _ in range(a.steps_per_epoch):
        x, y = next(c), next(d)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchLoader(seqs, 8, seed=12).load_state_dict(state)
    assert not np.array_equal(next(GlobalBatchLoader(seqs, 8, seed=12))["input_ids"], first[0]["input_ids"])


@pytest.mark.parametrize("n", [1, 9, 1000, 54_321])
def test_loader_order_is_numpys_permutation_in_four_byte_indices(n):
    """The order of checkpoints written before the loader stored int32 indices: resuming one continues alike."""
    order = permutation(n, np.random.default_rng([11, 3]))
    assert order.dtype == np.int32 and order.tolist() == np.random.default_rng([11, 3]).permutation(n).tolist()


def test_text_files_are_checked(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text(TEXT)
    assert resolve_text_files([str(tmp_path / "*.txt")]) == [str(good)]
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="data.paths.*empty"):
        resolve_text_files([str(tmp_path / "empty.txt")])
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\xff\xfe" * 100)
    with pytest.raises(UserError, match="data.paths.*(binary|UTF-8)"):
        resolve_text_files([str(tmp_path / "bin.txt")])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    with pytest.raises(UserError, match="not UTF-8"):
        resolve_text_files([str(tmp_path / "latin1.txt")])


def test_text_files_source_builds_sequences(tmp_path, cache_dir):
    f = tmp_path / "book.txt"
    f.write_text("\n\n".join(f"Paragraph {i} tells of rings, keys and values passed along." for i in range(400)))
    cfg = Config(
        model=ModelConfig(arch="gpt", vocab_size=300, max_seq_len=32),
        data=DataConfig(source="text_files", paths=[str(f)], seq_len=32, cache_dir=str(cache_dir)),
        trainer=TrainerConfig(global_batch_size=4),
    )
    d = build_sequences(cfg)
    assert len(d.train) > 4 and len(d.tokenizer) <= 300


def test_raw_text_is_prepared_once_into_the_cache_until_it_changes(tmp_path, monkeypatch):
    """The second build of the same text reads the prepared dataset in the cache without preparing again; an
    edited file is prepared again, into another cache entry."""
    import seqpar.data.prepared.cache as cache

    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(f"Paragraph {i} tells of rings, keys and values passed along." for i in range(300)))
    cfg = Config(
        model=ModelConfig(arch="gpt", vocab_size=300, max_seq_len=32),
        data=DataConfig(source="text_files", paths=[str(book)], seq_len=32, cache_dir=str(tmp_path / "cache"), num_proc=1),
        trainer=TrainerConfig(global_batch_size=4),
    )
    first = build_sequences(cfg)
    assert len(list((tmp_path / "cache" / "prepared").glob("gpt-*/manifest.json"))) == 1

    def no_preparing(*args, **kwargs):
        raise AssertionError("the text was prepared again")

    with monkeypatch.context() as m:
        m.setattr(cache, "prepare_dataset", no_preparing)
        again = build_sequences(cfg)
    assert np.array_equal(again.train.stream[:], first.train.stream[:]) and again.dataset_id == first.dataset_id

    book.write_text(book.read_text() + "\n\nA last paragraph about sequence parallelism.")
    edited = build_sequences(cfg)
    assert len(list((tmp_path / "cache" / "prepared").glob("gpt-*/manifest.json"))) == 2
    assert len(edited.train.stream) + len(edited.val.stream) > len(first.train.stream) + len(first.val.stream)


def test_hf_dataset_source_loads_a_local_dataset(tmp_path, cache_dir):
    """`data=hf_dataset` goes through datasets.load_dataset; a local directory stands in for a hub name offline."""
    import json

    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"body": f"Record {i}: the sequence is split into chunks, one per device, and passed around."} for i in range(300)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = Config(
        model=ModelConfig(arch="bert", vocab_size=300, max_seq_len=32),
        data=DataConfig(source="hf_dataset", hf_name=str(folder), text_column="body", seq_len=32, cache_dir=str(cache_dir)),
        trainer=TrainerConfig(global_batch_size=4),
    )
    d = build_sequences(cfg)
    assert len(d.train) >= 4 and d.train.get(0)["attention_mask"].sum() > 2
    bad = Config(model=cfg.model, data=DataConfig(source="hf_dataset", hf_name=str(folder), text_column="text"))
    with pytest.raises(UserError, match="data.text_column"):
        build_sequences(bad)
