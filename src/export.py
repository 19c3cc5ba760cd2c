"""Export a training checkpoint, whatever its layout, as a transformers directory.

    python -m seqpar.export outputs/run/checkpoints/step_00000200 exported/
    python -m seqpar.export outputs/run/checkpoints exported/        # the newest checkpoint there

The checkpoint's tensors are read in one process (DCP gathers every tensor-parallel shard and pipeline stage into
the whole model) and written as GPT2LMHeadModel or BertForMaskedLM safetensors, with the run's tokenizer. Every
file's size and CRC-32 are checked first; meta.json says which engine wrote the checkpoint, and DeepSpeed's files
are read weights-only. Errors are one `error:` line (exit 2); an existing output directory is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from seqpar.errors import UserError
from seqpar.models import build_model
from seqpar.models.hf import not_exportable, save_pretrained
from seqpar.trainer.checkpoint import (
    load_model_weights,
    model_config_of,
    newest_if_root,
    read_meta,
    verify_files,
)


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the model of `checkpoint` (a step_* directory, or a directory of them: the newest) to `out_dir`."""
    path, out = newest_if_root(Path(checkpoint)), Path(out_dir)
    meta = read_meta(path, field_name="checkpoint")
    if out.exists() and any(out.iterdir()):
        raise UserError("out_dir", f"({out}) exists and is not empty", "choose a new output directory")
    if not_exportable(model_config_of(meta)):
        raise UserError("checkpoint", f"({path}) cannot be exported: {not_exportable(model_config_of(meta))}",
                          "keep using the checkpoint with train.py (checkpoint.resume=<it>)")
    verify_files(path, meta, "checkpoint", "export another checkpoint of the run (a step_* directory)")  # CRC-32s
    model = build_model(model_config_of(meta), "cpu")
    load_model_weights(path, model, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_pretrained(model, tmp)
        if (path / "tokenizer").is_dir():
            for f in (path / "tokenizer").iterdir():
                shutil.copy2(f, tmp / f.name)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seqpar.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a step_* checkpoint directory, or a checkpoint.dir (its newest)")
    parser.add_argument("out_dir", help="the transformers directory to create")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"exported {args.checkpoint} to {out}")


if __name__ == "__main__":
    main()
