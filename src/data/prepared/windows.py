"""Training windows read from a prepared dataset, with only the windows asked for read from disk.

GPT: a split's token stream (documents each followed by end-of-text) is itself the input of `PackedSequences`,
which cuts window i as tokens [i*L, (i+1)*L + 1). BERT: documents are packed greedily into bodies of at most
L - 2 tokens (a longer document is split), exactly as `seqpar.data.sequences.pack_windows` packs in memory. Since
the pieces of a body are consecutive in the stream, a body is one token range: the packing is stored as window
boundaries (`pack-<split>-L<L>.npy`, made at prepare time for the configured length, or here for another one), and
`FramedWindows` frames the range with [CLS] ... [SEP] and padding when a window is read.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqpar.data.prepared.format import SPLITS, TOKENIZER_DIR, TokenStream, pack_file, read_manifest
from seqpar.data.tokenizer import check_vocab, load_tokenizer_dir, tokenizer_digest
from seqpar.errors import UserError


def pack_bounds(lengths: Iterable[int], body: int) -> np.ndarray:
    """Window boundaries (int64, windows + 1) of the greedy packing of documents with these token counts into
    bodies of at most `body` tokens: a piece (a document, or a `body`-long part of a longer one) that does not fit
    in the current window starts the next one."""
    bounds, used, pos = array("q", [0]), 0, 0
    for n in lengths:
        while n > 0:
            piece = min(body, n)
            if used + piece > body:
                bounds.append(pos)
                used = 0
            used += piece
            pos += piece
            n -= piece
    if used:
        bounds.append(pos)
    return np.frombuffer(bounds, dtype=np.int64).copy()


class WindowLengths:
    """Real tokens per window ([CLS] and [SEP] included), computed from the window boundaries when indexed: an array
    of them would hold 8 bytes per window of the corpus in every rank's memory."""

    def __init__(self, bounds: np.ndarray):
        self.bounds = bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> int:
        return int(self.bounds[i + 1] - self.bounds[i]) + 2

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return (np.diff(self.bounds) + 2).astype(dtype or np.int64)


class FramedWindows:
    """BERT windows, (windows, seq_len) as an array would be: row i is [CLS] body_i [SEP] then [PAD]s, read from the
    stream when indexed. `lengths`: real tokens per window, [CLS] and [SEP] included (`WindowLengths`)."""

    def __init__(self, stream: TokenStream, bounds: np.ndarray, seq_len: int, cls_id: int, sep_id: int, pad_id: int):
        self.stream, self.bounds, self.seq_len = stream, bounds, seq_len
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.lengths = WindowLengths(bounds)
        self.shape = (len(bounds) - 1, seq_len)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        body = self.stream[int(self.bounds[i]) : int(self.bounds[i + 1])]
        out = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        out[0], out[1 : 1 + len(body)], out[1 + len(body)] = self.cls_id, body, self.sep_id
        return out


@dataclass
class PreparedData:
    """An opened prepared dataset: its manifest, tokenizer and the token stream of each split."""

    root: Path
    manifest: dict
    tokenizer: object
    streams: dict[str, TokenStream]

    @property
    def id(self) -> str:
        return self.manifest["id"]

    def windows(self, split: str, seq_len: int) -> FramedWindows:
        """BERT's framed windows of `split` for `seq_len` (the stored packing when there is one)."""
        stream, name = self.streams[split], pack_file(split, seq_len)
        if name in self.manifest["packs"]:
            bounds = np.load(self.root / name, mmap_mode="r")
            if len(bounds) != self.manifest["packs"][name]["windows"] + 1 or bounds[0] != 0 or bounds[-1] != len(stream):
                raise UserError("data.path", f"({self.root}) has a corrupted packing index {name}",
                                "prepare it again (python -m seqpar.prepare ... --out DIR)")
        else:
            bounds = pack_bounds(stream.document_lengths(), seq_len - 2)
        tok = self.tokenizer
        return FramedWindows(stream, bounds, seq_len, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)


def check_prepared(root: Path, arch: str, model_vocab_size: int) -> dict:
    """The manifest of a complete prepared dataset made for this architecture and vocabulary size (cheap: reads
    the manifest and the files' sizes, for the checks before a job starts)."""
    manifest = read_manifest(root)
    if manifest.get("arch") != arch:
        raise UserError("data.path", f"({root}) was prepared for model.arch={manifest.get('arch')}, this run has {arch}",
                        "prepare the data with this model's overrides (model=...) into another --out directory")
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab > model_vocab_size:
        raise UserError("model.vocab_size", f"({model_vocab_size}) is smaller than the prepared tokenizer's "
                        f"vocabulary ({vocab}, {root})", f"set model.vocab_size>={vocab} or prepare with a smaller one")
    return manifest


def open_prepared(root: Path, arch: str, model_vocab_size: int) -> PreparedData:
    """Open a prepared dataset for a model: the manifest and files checked, its tokenizer loaded and checked."""
    manifest = check_prepared(root, arch, model_vocab_size)
    tok = load_tokenizer_dir(str(root / TOKENIZER_DIR), arch)
    if tokenizer_digest(tok) != manifest["tokenizer"]["digest"]:
        raise UserError("data.path", f"({root}) has a tokenizer/ that is not the one its tokens were made with "
                        "(its digest differs from the manifest's)", "prepare it again (python -m seqpar.prepare ... --out DIR)")
    check_vocab(tok, model_vocab_size)
    return PreparedData(root, manifest, tok, {s: TokenStream(root, s, manifest) for s in SPLITS})
