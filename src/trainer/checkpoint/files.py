"""Reading a checkpoint's files safely: meta.json (with every file's recorded size), DCP's `.metadata` index through
an unpickler that takes only DCP's own classes, the CRC-32 of every file, and DeepSpeed's files weights-only."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import zlib
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from seqpar.errors import UserError
from seqpar.trainer.checkpoint.paths import META
from seqpar.trainer.checkpoint.ranks import gather, rank_and_world

FORMAT = 1  # meta.json's layout and the DCP keys (model.*, optim.*, rng.rank<r>.*); older and newer are refused
FIX = "resume from another checkpoint (checkpoint.resume=<step_* dir>) or start fresh in a new run directory"

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    *((_DCP_METADATA, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                   "TensorStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch's layout object
    ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    *(("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), (torch.dtype, torch.layout))),
    *(("builtins", n) for n in ("set", "frozenset", "slice", "complex")),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` index and nothing else: DCP's metadata classes, torch sizes and dtypes."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint index")


class SafeReader(FileSystemReader):
    """DCP's file reader, with the index read by `MetadataUnpickler` (DCP reads the tensors weights-only)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        metadata = MetadataUnpickler(io.BytesIO((Path(self.path) / ".metadata").read_bytes())).load()
        # Entries DCP would read as pickled bytes (we never save any) could run code: refuse them.
        if not isinstance(metadata, Metadata) or not all(
            isinstance(md, TensorStorageMetadata) for md in metadata.state_dict_metadata.values()
        ):
            raise pickle.UnpicklingError("the index lists entries that are not tensors")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def storage_reader(path: Path) -> SafeReader:
    return SafeReader(str(path))


def crc(path: Path) -> int:
    out = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            out = zlib.crc32(chunk, out)
    return out


def bad(path: Path, problem: str, fix: str = FIX, field_name: str = "checkpoint.resume") -> UserError:
    """The one-line error for an unusable checkpoint, naming the setting or argument that pointed at it."""
    return UserError(field_name, f"({path}) {problem}", fix)


def damage(e: UserError, path: Path) -> str:
    """What a failed check found, without the setting's name and the fix."""
    return e.problem.removeprefix(f"({path}) ")


def read_meta(path: Path, field_name: str = "checkpoint.resume") -> dict:
    """The checkpoint's meta.json, after checking that every file it lists is there with its recorded size.
    Errors name `field_name` (the setting or argument that pointed at the checkpoint)."""
    def refuse(problem: str, *fix: str) -> UserError:
        return bad(path, problem, *fix, field_name=field_name)

    if not path.is_dir():
        raise refuse("is not a directory",
                     "pass the path of a step_* checkpoint directory or of a directory holding them")
    meta_file = path / META
    if not meta_file.is_file():
        raise refuse("has no meta.json: a half-written checkpoint (its save was interrupted) or not a seqpar "
                     "checkpoint")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        files, step = meta["files"], int(meta["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise refuse("has a corrupted meta.json") from None
    if meta.get("format") != FORMAT:
        raise refuse(f"has format {meta.get('format')!r}, this seqpar reads format {FORMAT}")
    for name, (size, _) in files.items():
        f = path / name
        if not f.is_file():
            raise refuse(f"is missing {name}")
        if f.stat().st_size != size:
            raise refuse(f"file {name} has {f.stat().st_size} bytes, {size} were written: truncated or altered")
    try:
        storage_reader(path).read_metadata()
    except Exception as e:
        detail = (str(e).strip().splitlines() or [""])[0][:120]
        raise refuse(f"has an unreadable tensor index .metadata ({type(e).__name__}: {detail})") from None
    meta["step"] = step
    return meta


def verify_files(path: Path, meta: dict, field_name: str = "checkpoint.resume", *fix: str) -> None:
    """Every rank checks the CRC-32 of a share of the files; any mismatch fails every rank with its name."""
    rank, world = rank_and_world()
    names = sorted(meta["files"])
    wrong = [n for i, n in enumerate(names) if i % world == rank and crc(path / n) != meta["files"][n][1]]
    wrong = sorted(n for part in gather(wrong) for n in part)
    if wrong:
        raise bad(path, f"file {wrong[0]} does not match its recorded checksum: the checkpoint is corrupted", *fix,
                  field_name=field_name)


@contextlib.contextmanager
def deepspeed_files(path: Path, field_name: str):
    """DeepSpeed reads its own files, weights-only (`engine.weights_only_loads`); a file holding anything else
    (a crafted pickle) becomes one `error:` line naming what it holds."""
    try:
        yield
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise bad(path, f"has a DeepSpeed file holding an object seqpar does not unpickle{what}: crafted, or "
                  "written by another program", "use only checkpoints written by seqpar's trainer.engine=deepspeed",
                  field_name=field_name) from None
