"""Prepare a corpus for training: tokenize it once into memory-mapped shards that training reads in place.

    seqpar-prepare --out /data/books-gpt data=text_files 'data.paths=[/data/books/*.txt]'
    python -m seqpar.prepare --out /data/wiki-bert model=bert_base data=hf_dataset data.hf_name=/data/wiki
    python train.py data=prepared data.path=/data/books-gpt        # then train on it

The overrides are `train.py`'s: the model (its architecture and vocabulary size choose the tokenizer), the source
(`data=builtin|text_files|hf_dataset` and its settings), `data.tokenizer` or `data.tokenizer_sample_mib`,
`data.val_fraction`, `data.num_proc`, `data.shard_tokens`, and `data.seq_len` (BERT's packing is stored for it).
Run the same command again after an interruption: it continues where it stopped. docs/data.md has the format.
"""

from __future__ import annotations

import sys
from pathlib import Path

from seqpar.cli import compose, describe_hydra_error, fail, split_config_dir, with_config_dir
from seqpar.config import data_view
from seqpar.configs import CONFIG_DIR
from seqpar.data.prepared.writer import prepare_dataset
from seqpar.errors import UserError
from seqpar.validation.data import validate_data
from seqpar.validation.model import validate_model

USAGE = "usage: python -m seqpar.prepare --out DIR [--config-dir DIR] [train.py overrides...]"


def split_out(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --out directory or None, the other arguments)."""
    out, rest, args = None, [], iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name == "--out":
            out = value if eq else next(args, "")
        else:
            rest.append(arg)
    return out, rest


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\n" + USAGE)
        return
    out, rest = split_out(argv)
    if not out:
        fail("--out is not given; pass --out DIR, the directory to write the prepared dataset into")
    split = split_config_dir(rest)
    if split is None:
        fail(f"{next(a for a in rest if a.startswith('-'))} is not an option of seqpar.prepare; {USAGE}")
    config_dir, overrides = split
    try:
        cfg = compose(CONFIG_DIR, with_config_dir(overrides, config_dir) if config_dir is not None else overrides)
        validate_model(cfg.model)
        validate_data(cfg.data, cfg.model)
    except UserError as e:
        fail(str(e))
    except Exception as e:  # Hydra/OmegaConf composition errors
        fail(describe_hydra_error(e))
    try:
        manifest = prepare_dataset(data_view(cfg), Path(out))  # Llama prepares GPT data
    except UserError as e:
        fail(str(e))
    splits = manifest["splits"]
    print(f"prepared {out}: {splits['train']['documents']:,} training documents ({splits['train']['tokens']:,} "
          f"tokens), {splits['val']['documents']:,} validation documents ({splits['val']['tokens']:,} tokens), "
          f"{len(manifest['shards'])} shard(s), {manifest['dtype']}; train with data=prepared data.path={out}")


if __name__ == "__main__":
    main()
