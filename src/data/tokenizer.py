"""Tokenizers: trained locally with `tokenizers` (saved with the prepared data they made), or loaded from a local transformers directory.

GPT gets a byte-level BPE with an `<|endoftext|>` document separator; BERT a lower-cased WordPiece with
[PAD] [UNK] [CLS] [SEP] [MASK]. Both are returned as `transformers.PreTrainedTokenizerFast`, so a trained
tokenizer and a user's own directory behave the same and `save_pretrained` writes either next to the model.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from seqpar.errors import UserError

GPT_EOS = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _train(arch: str, texts: Iterator[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if arch == "gpt":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[GPT_EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if arch == "bert":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    return tok


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    if tok.token_to_id(GPT_EOS) is not None:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=GPT_EOS, bos_token=GPT_EOS, unk_token=GPT_EOS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def train_tokenizer(arch: str, texts: Iterator[str], vocab_size: int):
    """A tokenizer for `arch` trained on `texts` with at most `vocab_size` tokens (not cached)."""
    return _wrap(_train(arch, texts, vocab_size))


def tokenizer_digest(tok) -> str | None:
    """A digest of everything that decides a fast tokenizer's ids; None for a tokenizer without one (slow)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha1(backend.to_str().encode()).hexdigest()


def load_tokenizer_dir(path: str, arch: str):
    """A user's transformers tokenizer directory, checked for the special tokens `arch` needs."""
    if not Path(path).is_dir():
        raise UserError("data.tokenizer", f"({path}) is not a directory", "pass a local transformers tokenizer directory")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError("data.tokenizer", f"({path}) could not be loaded ({first})", "pass a directory with tokenizer.json or vocab files") from None
    needed = ["eos_token_id"] if arch == "gpt" else ["cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id"]
    missing = [n for n in needed if getattr(tok, n, None) is None]
    if missing:
        raise UserError("data.tokenizer", f"({path}) has no {', '.join(missing)} for model.arch={arch}", "use a tokenizer with those special tokens")
    return tok


def check_vocab(tok, model_vocab_size: int) -> None:
    if len(tok) > model_vocab_size:
        raise UserError(
            "model.vocab_size",
            f"({model_vocab_size}) is smaller than the tokenizer's vocabulary ({len(tok)})",
            f"set model.vocab_size>={len(tok)} or use a smaller tokenizer",
        )


def vocab_checksum(tok) -> int:
    """CRC-32 of the tokenizer's vocabulary (token -> id): equal for the same tokenizer wherever it was loaded."""
    return zlib.crc32(json.dumps(sorted(tok.get_vocab().items())).encode())
