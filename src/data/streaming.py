"""Training on a streamed `datasets` dataset without preparing it (`data=hf_dataset data.streaming=true`).

Each data-parallel rank reads its own part of the stream, `split_dataset_by_node(ds, rank=dp_rank, world_size=dp)`
(whole shards per rank when they divide evenly, else every dp-th document), tokenizes it as it goes and makes
windows the way a prepared dataset does: validation documents held out by position (`is_validation`), GPT windows
cut from the documents joined by end-of-text, BERT's greedy packing framed and MLM-masked. A rank holds one batch
of documents, never the dataset. Validation sequences are the first ones made from the validation documents of the
whole stream (every rank the same), enough for `trainer.eval_batches` global batches.

What differs from prepared data: sequences come in stream order (no shuffle) and each global batch is made of every
dp rank's own next sequences, so the data depends on dp. The position is, per dp rank, the document and token
offset where its next sequence starts: the trainer gathers them into the checkpoint, and a resumed run skips to
them (skipped documents are read, not tokenized) and continues with the same sequences. When a rank's part of the
stream ends it starts again (the next epoch: the same order, new MLM masks).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from seqpar.config import Config
from seqpar.data.corpus import cache_root
from seqpar.data.loader import collate, dropout_seed
from seqpar.data.prepared.encode import BATCH_CHARS, batches, encode_batch, make_tokenizer
from seqpar.data.prepared.sources import documents
from seqpar.data.prepared.writer import is_validation, settings
from seqpar.data.sequences import MLMSequences, PackedSequences, SequenceData, checked, packed_sequences
from seqpar.data.tokenizer import load_tokenizer_dir
from seqpar.errors import UserError

Position = tuple[int, int]  # (document index in this rank's stream, token offset in that document)


def _documents(cfg: Config, rank: int, world: int) -> Iterator[str]:
    import datasets
    from datasets.distributed import split_dataset_by_node

    d = cfg.data
    datasets.disable_progress_bars()
    ds = datasets.load_dataset(d.hf_name, d.hf_config, split=d.hf_split, streaming=True)
    if world > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
    for row in ds:
        text = row.get(d.text_column)
        if text and text.strip():
            yield text


class WindowStream:
    """The windows of one split of one rank's stream, each with the position where the next one starts."""

    def __init__(self, cfg: Config, tokenizer, split: str, rank: int = 0, world: int = 1, start: Position = (0, 0)):
        self.cfg, self.tok, self.split, self.rank, self.world = cfg, tokenizer, split, rank, world
        self.start = start
        self.gpt = cfg.model.arch == "gpt"
        self.seq_len = cfg.data.seq_len

    def _tokenized(self) -> Iterator[tuple[int, np.ndarray, int]]:
        """(document index, ids, offset of the first id in the document) of this split's documents from `start`,
        the separator appended for GPT."""
        f = self.cfg.data.val_fraction
        first, offset = self.start
        docs = itertools.islice(enumerate(_documents(self.cfg, self.rank, self.world)), first, None)
        wanted = ((i, t) for i, t in docs if bool(is_validation(np.array(i), f)) == (self.split == "val"))
        backend = self.tok.backend_tokenizer
        for chunk in batches(wanted, BATCH_CHARS, size=lambda item: len(item[1])):
            ids, lengths = encode_batch(backend, [t for _, t in chunk])
            for (i, _), doc in zip(chunk, np.split(ids, np.cumsum(lengths)[:-1]), strict=True):
                if self.gpt:
                    doc = np.append(doc, np.uint32(self.tok.eos_token_id))
                if i == first and offset:
                    doc = doc[offset:]
                    yield i, doc, offset
                else:
                    yield i, doc, 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, int, Position]]:
        """(window tokens, real tokens, position of the next window): GPT windows of seq_len + 1 tokens, BERT
        bodies of at most seq_len - 2."""
        return self._gpt() if self.gpt else self._bert()

    def _gpt(self):
        need, segments, held = self.seq_len + 1, deque(), 0  # segments: [doc, offset, ids]
        for i, doc, offset in self._tokenized():
            segments.append([i, offset, doc])
            held += len(doc)
            while held >= need:
                window = np.concatenate([s[2] for s in segments])[:need]
                drop = self.seq_len  # the next window starts at this one's last token (its last label)
                held -= drop
                while drop:
                    take = min(drop, len(segments[0][2]))
                    segments[0][1] += take
                    segments[0][2] = segments[0][2][take:]
                    drop -= take
                    if len(segments[0][2]) == 0:
                        segments.popleft()
                yield window, need, (segments[0][0], segments[0][1]) if segments else (i + 1, 0)

    def _bert(self):
        body, pieces, used = self.seq_len - 2, [], 0  # pieces of the window being filled: (doc, offset, ids)
        for i, doc, offset in self._tokenized():
            for j in range(0, len(doc), body):
                piece = doc[j : j + body]
                if used + len(piece) > body:
                    yield np.concatenate([p[2] for p in pieces]), used, (i, offset + j)
                    pieces, used = [], 0
                pieces.append((i, offset + j, piece))
                used += len(piece)
        # A part-filled last window is dropped: a stream has no end to wait for (epochs restart it).


class StreamingLoader:
    """This dp rank's share of each global batch from its part of the stream; the GlobalBatchLoader's interface
    (`__next__`, `state_dict`, `load_state_dict`, `epoch`, `step`)."""

    def __init__(self, cfg: Config, tokenizer, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        self.cfg, self.tok = cfg, tokenizer
        self.global_batch_size, self.dp_rank, self.dp_size, self.seed = global_batch_size, dp_rank, dp_size, seed
        self.share = global_batch_size // dp_size
        self.epoch, self.step, self.position = 0, 0, (0, 0)
        self.positions: list[list[int]] | None = None  # every dp rank's, gathered for a checkpoint
        self._windows: Iterator | None = None
        self._made = 0  # windows made this epoch by this rank (the MLM mask index)
        self._shape = (MLMSequences(np.zeros((0, cfg.data.seq_len), np.int32), np.zeros(0, np.int64), tokenizer, seed,
                                    cfg.data.mlm_probability) if cfg.model.arch == "bert"
                       else packed_sequences(cfg, np.zeros(0, np.int32), tokenizer))

    def _example(self, window: np.ndarray, length: int) -> dict:
        if isinstance(self._shape, PackedSequences):
            return self._shape.example(window)
        tok, seq_len = self.tok, self.cfg.data.seq_len
        framed = np.full(seq_len, tok.pad_token_id, dtype=np.int32)
        framed[0], framed[1 : 1 + length], framed[1 + length] = tok.cls_token_id, window, tok.sep_token_id
        index = self.dp_rank + self.dp_size * self._made  # distinct across ranks
        return self._shape.example(framed, length + 2, index, self.epoch)

    def _next_window(self):
        for _ in range(2):
            if self._windows is None:
                self._windows = iter(WindowStream(self.cfg, self.tok, "train", self.dp_rank, self.dp_size, self.position))
            item = next(self._windows, None)
            if item is not None:
                return item
            self.epoch, self.position, self._made, self._windows = self.epoch + 1, (0, 0), 0, None
        raise RuntimeError(f"data rank {self.dp_rank}'s part of the stream makes no training sequence")

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        examples = []
        for _ in range(self.share):
            window, length, self.position = self._next_window()
            examples.append(self._example(window, length))
            self._made += 1
        batch = collate(examples)
        slots = range(self.dp_rank * self.share, (self.dp_rank + 1) * self.share)
        batch["dropout_seed"] = torch.tensor([dropout_seed(self.seed, self.epoch, self.step, s) for s in slots])
        self.step += 1
        return batch

    def gather_positions(self, gather) -> None:
        """Collect every dp rank's position (`gather(value) -> [value of each rank]`, every rank calls it)."""
        docs, offsets, ranks = gather(float(self.position[0])), gather(float(self.position[1])), gather(float(self.dp_rank))
        by_rank = {int(r): [int(d), int(o)] for d, o, r in zip(docs, offsets, ranks, strict=True)}
        self.positions = [by_rank[r] for r in range(self.dp_size)]

    def state_dict(self) -> dict:
        positions = self.positions if self.positions is not None else [list(self.position)]
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "made": self._made, "streaming": {"dp": self.dp_size, "positions": positions}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("streaming")
        if saved is None or saved["dp"] != self.dp_size:
            there = f"parallel.dp={saved['dp']}" if saved else "a dataset that was not streamed"
            raise UserError("checkpoint.resume", f"holds the stream positions of {there}, this run has "
                            f"parallel.dp={self.dp_size} (each data rank reads its own part of the stream)",
                            "resume a streamed run with the same parallel.dp, or start fresh in a new hydra.run.dir")
        self.epoch, self.step, self._made = state["epoch"], state["step"], state["made"]
        self.position, self._windows = tuple(saved["positions"][self.dp_rank]), None


class StreamingSource:
    """The training side of a streamed dataset: each rank makes its own `StreamingLoader` from it."""

    streaming = True

    def __init__(self, cfg: Config, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def __len__(self) -> int:  # unknown for a stream; 0 keeps the cross-rank and checkpoint records consistent
        return 0

    def loader(self, global_batch_size: int, dp_rank: int, dp_size: int, seed: int) -> StreamingLoader:
        return StreamingLoader(self.cfg, self.tokenizer, global_batch_size, dp_rank, dp_size, seed)


def streaming_tokenizer(cfg: Config):
    """`data.tokenizer`, or one trained on the stream's first `data.tokenizer_sample_mib` MiB and kept in the cache
    (one process trains it under a file lock; the others wait and load it)."""
    if cfg.data.tokenizer:
        return make_tokenizer(cfg, None)
    from filelock import FileLock

    key = hashlib.sha1(json.dumps(settings(cfg), sort_keys=True).encode()).hexdigest()[:20]
    path = cache_root(cfg.data) / "streaming" / f"{cfg.model.arch}-{key}" / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            if not (path / "tokenizer.json").is_file():
                tok = make_tokenizer(cfg, lambda: documents(cfg.data))
                tmp = path.with_name(f".tmp-tokenizer-{os.getpid()}")
                tok.save_pretrained(str(tmp))
                os.replace(tmp, path)
    return load_tokenizer_dir(str(path), cfg.model.arch)


def build_streaming(cfg: Config) -> SequenceData:
    """A streamed dataset: the training source and the validation sequences (the first validation windows of the
    whole stream, enough for `trainer.eval_batches` global batches)."""
    tok = streaming_tokenizer(cfg)
    t, seq_len = cfg.trainer, cfg.data.seq_len
    windows = list(itertools.islice(WindowStream(cfg, tok, "val"), t.eval_batches * t.global_batch_size))
    if cfg.model.arch == "gpt":
        stream = (np.concatenate([w[:seq_len] for w, _, _ in windows] + [windows[-1][0][seq_len:]]) if windows
                  else np.zeros(0))
        val = packed_sequences(cfg, stream.astype(np.int32), tok)
    else:
        framed = np.full((len(windows), seq_len), tok.pad_token_id, dtype=np.int32)
        lengths = np.zeros(len(windows), dtype=np.int64)
        for row, (body, n, _) in zip(framed, windows, strict=True):
            row[0], row[1 : 1 + n], row[1 + n] = tok.cls_token_id, body, tok.sep_token_id
        lengths[:] = [n + 2 for _, n, _ in windows]
        val = MLMSequences(framed, lengths, tok, t.seed, cfg.data.mlm_probability)
    return checked(cfg, SequenceData(StreamingSource(cfg, tok), val, tokenizer=tok))
