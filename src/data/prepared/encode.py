"""The tokenizer of a prepared dataset and tokenization over several processes.

The tokenizer is the user's (`data.tokenizer`, a transformers directory) or one trained on the first
`data.tokenizer_sample_mib` MiB of documents: a bounded sample, so training it takes the same time and memory
whatever the corpus size. Documents are then encoded in batches with the `tokenizers` library's `encode_batch` by
`data.num_proc` worker processes (None: one per core), a few batches in flight per worker, and the ids come back in
document order. Memory is bounded by the batches in flight and the longest document: the library holds an
encoding object per document whose size grows with its tokens (docs/benchmarks.md has the measurement).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from seqpar.config import Config
from seqpar.data.tokenizer import check_vocab, load_tokenizer_dir, train_tokenizer
from seqpar.parallel.signals import handling

BATCH_CHARS = 1 << 18  # characters of text per encoding batch
IN_FLIGHT = 3  # batches queued per worker


def sample(texts: Iterable[str], mib: float) -> Iterator[str]:
    """The first documents of `texts`, up to `mib` MiB of text (at least one document)."""
    budget = int(mib * (1 << 20))
    for text in texts:
        yield text
        budget -= len(text)
        if budget <= 0:
            return


def make_tokenizer(cfg: Config, texts_fn):
    """The user's tokenizer (`data.tokenizer`) or one trained on a bounded sample of `texts_fn()`."""
    d = cfg.data
    tok = (load_tokenizer_dir(d.tokenizer, cfg.model.arch) if d.tokenizer
           else train_tokenizer(cfg.model.arch, sample(texts_fn(), d.tokenizer_sample_mib), cfg.model.vocab_size))
    check_vocab(tok, cfg.model.vocab_size)
    return tok


def worker_count(num_proc: int | None) -> int:
    if num_proc is not None:
        return num_proc
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def batches(items: Iterable, chars: int = BATCH_CHARS, size=len) -> Iterator[list]:
    """`items` in lists of about `chars` characters (`size(item)`: an item's characters)."""
    batch, total = [], 0
    for item in items:
        batch.append(item)
        total += size(item)
        if total >= chars:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def encode_batch(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids of every document back to back (uint32), each document's length (int64))."""
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which we do not keep.
    encode_fn = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encodings = encode_fn(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter((t for e in encodings for t in e.ids), dtype=np.uint32, count=int(lengths.sum()))
    return ids, lengths


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_batch(_WORKER_TOKENIZER, texts)


def encode(tokenizer_json: str, text_batches: Iterable[list[str]], num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`encode_batch` of each batch, in order: in this process for `num_proc` 1, else in a pool of `num_proc`
    workers. Workers are forked where the platform can (spawning would import the caller's main module again);
    they encode with one thread each, and the `tokenizers` thread pool is switched off before forking, which also
    keeps the library from warning about a fork after its pool was used (by the tokenizer's training)."""
    if num_proc <= 1:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        for texts in text_batches:
            yield encode_batch(tok, texts)
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # The workers inherit SIGTERM's default action: the pool's shutdown stops a worker with SIGTERM, and one that
    # inherited a handler that only records it (a trainer's, a launcher's) and never started (a fork can copy a
    # lock another thread held) would keep the shutdown waiting forever.
    with handling((signal.SIGTERM,), signal.SIG_DFL):
        pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer_json,))
    with pool:
        pending: deque = deque()
        for texts in text_batches:
            pending.append(pool.apply_async(_encode_in_worker, (texts,)))
            if len(pending) >= IN_FLIGHT * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
