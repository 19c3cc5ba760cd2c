"""Training sequences made from tokenized documents, with everything computed on the whole sequence.

- GPT (`PackedSequences`): documents joined by the end-of-text token into one stream, cut into windows of `seq_len`
  tokens; the labels are the next tokens of the stream, so the last position of a window has a target too. With
  `data.document_mask` each example also carries `document_ids`, the index within the window of the document each
  token belongs to, so attention can stay inside documents; `data.document_positions=restart` counts positions
  from 0 at each document (`document_layout`).
- BERT (`MLMSequences`): documents packed greedily into windows of `seq_len - 2` tokens (a document longer than
  that is split), framed by [CLS] ... [SEP] and padded, with an attention mask; MLM corruption is applied when an
  example is read (`mlm.py`), deterministic from (seed, epoch, index).

Position ids, labels and padding masks are made here, on whole sequences, so that a sequence-parallel chunk carries
its own positions and targets and nothing is lost at a chunk boundary.

Training reads a prepared dataset in place (`seqpar.data.prepared`): the GPT stream is its memory-mapped token
stream and BERT's windows are framed from it when read, so a rank reads only the sequences of its batches. The
in-memory `pack_stream` / `pack_windows` make the same sequences from a list of documents (tests, small data).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqpar.config import Config
from seqpar.data.mlm import example_rng, mlm_mask
from seqpar.data.prepared.blend import BlendedSequences
from seqpar.data.prepared.cache import prepared_in_cache
from seqpar.data.prepared.windows import PreparedData, open_prepared
from seqpar.errors import UserError

Example = dict[str, np.ndarray]


def document_layout(inputs: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(document_ids, positions) of a window's input tokens, documents separated by `eos_id`.

    The end-of-text token belongs to the document it ends: it sees that document only, as in the document run
    alone with its end-of-text token last, and its target (the next document's first token, the stream's next
    token) is kept, so every token of a window keeps its target and a document's first token is still learned,
    predicted from a document's end. A window starting inside a document gives that part document 0 and positions
    from 0, as one run over the part alone would."""
    ends = inputs == eos_id
    ids = np.zeros(len(inputs), dtype=np.int64)
    np.cumsum(ends[:-1], out=ids[1:])  # a new document starts after each end-of-text token
    starts = np.flatnonzero(np.r_[True, ends[:-1]])  # the first position of each document
    positions = np.arange(len(inputs), dtype=np.int64) - starts[ids]
    return ids, positions


class PackedSequences:
    def __init__(self, stream: np.ndarray, seq_len: int, eos_id: int | None = None, mask_documents: bool = False,
                 restart_positions: bool = False):
        self.stream = stream  # (N,) token ids, documents separated by EOS: an array or a prepared TokenStream
        self.seq_len = seq_len
        self.positions = np.arange(seq_len, dtype=np.int64)
        assert eos_id is not None or not (mask_documents or restart_positions), "documents need the EOS id"
        self.eos_id, self.mask_documents, self.restart_positions = eos_id, mask_documents, restart_positions

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.seq_len)

    def get(self, index: int, epoch: int = 0) -> Example:
        s = index * self.seq_len
        return self.example(self.stream[s : s + self.seq_len + 1])

    def example(self, window: np.ndarray) -> Example:
        """The example of a window of seq_len + 1 tokens (inputs and next-token labels)."""
        window = window.astype(np.int64)
        example = {"input_ids": window[:-1], "labels": window[1:], "position_ids": self.positions}
        if self.mask_documents or self.restart_positions:
            ids, positions = document_layout(window[:-1], self.eos_id)
            if self.mask_documents:
                example["document_ids"] = ids
            if self.restart_positions:
                example["position_ids"] = positions
        return example


def packed_sequences(cfg: Config, stream: np.ndarray, tokenizer) -> PackedSequences:
    """The GPT sequences of `stream` with the run's document settings (`cfg` as `config.data_view` gives it)."""
    d = cfg.data
    return PackedSequences(stream, d.seq_len, tokenizer.eos_token_id, mask_documents=bool(d.document_mask),
                           restart_positions=d.document_positions == "restart")


class MLMSequences:
    def __init__(self, windows: np.ndarray, lengths: np.ndarray, tok, seed: int, probability: float):
        self.windows = windows  # (N, L) int32, [CLS] ... [SEP] then [PAD]: an array or prepared FramedWindows
        self.lengths = lengths  # (N,) real tokens per window, [CLS] and [SEP] included
        self.seed = seed
        self.probability = probability
        self.mask_id = tok.mask_token_id
        self.special = np.array(sorted(set(tok.all_special_ids)), dtype=np.int64)
        self.random_ids = np.setdiff1d(np.arange(len(tok), dtype=np.int64), self.special)
        self.positions = np.arange(windows.shape[1], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.windows)

    def get(self, index: int, epoch: int = 0) -> Example:
        return self.example(self.windows[index], int(self.lengths[index]), index, epoch)

    def example(self, window: np.ndarray, length: int, index: int, epoch: int) -> Example:
        """The example of a framed window with `length` real tokens, masked as window `index` of `epoch`."""
        ids = window.astype(np.int64)
        attention_mask = (self.positions < length).astype(np.int64)
        maskable = attention_mask.astype(bool) & ~np.isin(ids, self.special)
        rng = example_rng(self.seed, epoch, index)
        input_ids, labels = mlm_mask(ids, maskable, rng, self.mask_id, self.random_ids, self.probability)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": self.positions,
            "attention_mask": attention_mask,
            "token_type_ids": np.zeros_like(ids),
        }


def pack_stream(docs, eos_id: int) -> np.ndarray:
    """Concatenate documents (sequences of ids), each followed by `eos_id`."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    out = np.full(int(lengths.sum()) + len(docs), eos_id, dtype=np.int32)
    is_token = np.ones(len(out), dtype=bool)
    is_token[np.cumsum(lengths + 1) - 1] = False
    if len(docs):
        out[is_token] = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs])
    return out


def pack_windows(docs, seq_len: int, cls_id: int, sep_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of documents into [CLS] body [SEP] [PAD]... windows of `seq_len` tokens."""
    body = seq_len - 2
    bodies: list[list] = []  # each a list of pieces (id arrays) that fill one window
    current: list = []
    used = 0
    for doc in docs:
        doc = np.asarray(doc, dtype=np.int32)
        for i in range(0, len(doc), body):
            piece = doc[i : i + body]
            if used + len(piece) > body:
                bodies.append(current)
                current, used = [], 0
            current.append(piece)
            used += len(piece)
    if current:
        bodies.append(current)
    windows = np.full((len(bodies), seq_len), pad_id, dtype=np.int32)
    lengths = np.empty(len(bodies), dtype=np.int64)
    for i, pieces in enumerate(bodies):
        b = np.concatenate(pieces)
        windows[i, 0] = cls_id
        windows[i, 1 : 1 + len(b)] = b
        windows[i, 1 + len(b)] = sep_id
        lengths[i] = len(b) + 2
    return windows, lengths


@dataclass
class SequenceData:
    train: PackedSequences | MLMSequences | BlendedSequences
    val: PackedSequences | MLMSequences | BlendedSequences
    tokenizer: object
    dataset_id: str | None = None  # a prepared dataset's id (its manifest's), recorded in checkpoints


def build_sequences(cfg: Config) -> SequenceData:
    """The training and validation sequences, read in place from a prepared dataset: `data.path` (or a blend of
    `data.sources`) for `data.source=prepared`, else the raw source prepared into the cache
    (`seqpar.data.prepared.cache`)."""
    d = cfg.data
    if d.sources:
        return checked(cfg, _blended(cfg))
    data = open_prepared(Path(d.path) if d.source == "prepared" else prepared_in_cache(cfg), cfg.model.arch,
                         cfg.model.vocab_size)
    train, val = (_split(cfg, data, split) for split in ("train", "val"))
    return checked(cfg, SequenceData(train, val, tokenizer=data.tokenizer, dataset_id=data.id))


def _split(cfg: Config, data: PreparedData, split: str) -> PackedSequences | MLMSequences:
    d = cfg.data
    if cfg.model.arch == "gpt":
        return packed_sequences(cfg, data.streams[split], data.tokenizer)
    windows = data.windows(split, d.seq_len)
    return MLMSequences(windows, windows.lengths, data.tokenizer, cfg.trainer.seed, d.mlm_probability)


def _blended(cfg: Config) -> SequenceData:
    """`data.sources` blended by weight (`seqpar.data.prepared.blend`); they must share one tokenizer."""
    sources = cfg.data.sources
    opened = [open_prepared(Path(s.path), cfg.model.arch, cfg.model.vocab_size) for s in sources]
    if len({o.manifest["tokenizer"]["digest"] for o in opened}) > 1:
        raise UserError("data.sources", "were prepared with different tokenizers",
                        f"prepare every source with one tokenizer, e.g. data.tokenizer={Path(sources[0].path) / 'tokenizer'}")
    names = [Path(s.path).name or f"source{i}" for i, s in enumerate(sources)]
    names = [n if names.count(n) == 1 else f"{n}.{i}" for i, n in enumerate(names)]
    weights = [s.weight for s in sources]
    train, val = (BlendedSequences([_split(cfg, o, split) for o in opened], weights, names, cfg.trainer.seed)
                  for split in ("train", "val"))
    key = json.dumps([[o.id, s.weight] for o, s in zip(opened, sources, strict=True)])
    return SequenceData(train, val, tokenizer=opened[0].tokenizer, dataset_id=hashlib.sha1(key.encode()).hexdigest()[:16])


def checked(cfg: Config, data: SequenceData) -> SequenceData:
    """`data`, when it has a global batch of training sequences and a validation sequence."""
    d = cfg.data
    if not getattr(data.train, "streaming", False) and len(data.train) < cfg.trainer.global_batch_size:
        raise UserError(
            "trainer.global_batch_size",
            f"({cfg.trainer.global_batch_size}) is more than the {len(data.train)} training sequences of length {d.seq_len}",
            "use a smaller global batch or data.seq_len, or more data",
        )
    if len(data.val) == 0:
        raise UserError("data.val_fraction", f"({d.val_fraction}) leaves no validation sequence", "raise it or add data")
    return data
