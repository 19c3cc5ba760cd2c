"""Distributed checkpoints: everything a run needs to continue exactly, in any layout.

A checkpoint is a directory `<checkpoint.dir>/step_00000042/` holding

- the tensors, written by `torch.distributed.checkpoint` (DCP) with every rank saving its own shards in parallel:
  `model.<name>` (each parameter and buffer as the rank holds it: a tensor-parallel DTensor shard, this pipeline
  stage's layers), `optim.<name>.{exp_avg,exp_avg_sq,step}` (AdamW's state, keyed by parameter name so that it
  reshards like the parameter) and `rng.rank<r>.{cpu,cuda}` (each rank's generator state);
- `meta.json`, written last by rank 0: the step, the model architecture, the layout, the data settings (and the
  tokenizer's vocabulary checksum and training-set size they made), the data loader's position, the learning-rate
  schedule's state, the skipped-step counters, and the size and CRC-32 of every file;
- `tokenizer/`, so that `python -m seqpar.export` makes a complete transformers directory.

Under `trainer.engine=deepspeed` the model and optimizer are saved by DeepSpeed itself into `deepspeed/` (ZeRO's
files, one optimizer partition per data-parallel rank); DCP then holds only the RNG states, and meta.json the
rest as above. Such a checkpoint resumes with the same engine, ZeRO stage and layout.

Names are global (a pipeline stage's layers keep their index; the tied head keeps its own name), so DCP can load a
checkpoint into another dp x pp x tp x sp layout: it reads each rank's slice of every tensor from whichever files
hold it. The RNG states are restored only into the same layout (they describe each rank's own dropout stream).

Writes are atomic: ranks write into `.tmp-step_*`; once every rank is done, rank 0 writes `meta.json`, syncs and
renames the directory to `step_*`. A directory without `meta.json` is never taken for a checkpoint. Loading never
unpickles arbitrary objects: tensors are read with `torch.load(weights_only=True)` by DCP, DCP's `.metadata` index
is read by an unpickler that only accepts DCP's own metadata classes and torch's dtypes and sizes, and DeepSpeed's
files (only where meta.json names that engine) weights-only with DeepSpeed's few classes allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from seqpar.config import Config, ModelConfig
from seqpar.errors import UserError
from seqpar.trainer.weights import WRAPPER, state_by_name

FORMAT = 1
STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"
# The architecture a checkpoint's tensors belong to (dropout, name and init_from may differ on resume).
ARCH_FIELDS = ("arch", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "vocab_size", "max_seq_len",
               "activation", "type_vocab_size", "attention", "linformer_k")
LAYOUT_FIELDS = ("dp", "pp", "tp", "sp", "sp_impl", "pp_schedule", "microbatches")
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "step"  # trainer.engine=deepspeed: <checkpoint>/deepspeed/step/


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(cfg: Config) -> Path:
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir)
    if cfg.run_dir is None:
        raise UserError("checkpoint.dir", "is not set and there is no run directory", "pass checkpoint.dir=<dir>")
    return Path(cfg.run_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """The published checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


# --- reading, safely -------------------------------------------------------------------------------------------

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


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` index and nothing else: DCP's metadata classes, torch sizes and dtypes."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint index")


def _storage_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = _MetadataUnpickler(io.BytesIO((Path(self.path) / ".metadata").read_bytes())).load()
            # Entries DCP would read as pickled bytes (we never save any) could run code: refuse them.
            if not isinstance(metadata, Metadata) or not all(
                isinstance(md, TensorStorageMetadata) for md in metadata.state_dict_metadata.values()
            ):
                raise pickle.UnpicklingError("the index lists entries that are not tensors")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _bad(path: Path, problem: str, fix: str = "resume from another checkpoint (checkpoint.resume=<step_* dir>) "
         "or start fresh in a new run directory", field_name: str = "checkpoint.resume") -> UserError:
    return UserError(field_name, f"({path}) {problem}", fix)


def newest_if_root(path: Path) -> Path:
    """`path` itself, or the newest checkpoint in it when it is a checkpoint directory (a checkpoint.dir)."""
    if path.is_dir() and not (path / META).exists() and complete_checkpoints(path):
        return complete_checkpoints(path)[-1]
    return path


def read_meta(path: Path, field_name: str = "checkpoint.resume") -> dict:
    """The checkpoint's meta.json, after checking that every file it lists is there with its recorded size.
    Errors name `field_name` (the setting or argument that pointed at the checkpoint)."""
    def bad(problem: str, *fix: str) -> UserError:
        return _bad(path, problem, *fix, field_name=field_name)

    if not path.is_dir():
        raise bad("is not a directory", "pass the path of a step_* checkpoint directory or of a directory holding them")
    meta_file = path / META
    if not meta_file.is_file():
        raise bad("has no meta.json: a half-written checkpoint (its save was interrupted) or not a seqpar "
                   "checkpoint")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        files, step = meta["files"], int(meta["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise bad("has a corrupted meta.json") from None
    if meta.get("format") != FORMAT:
        raise bad(f"has format {meta.get('format')!r}, this seqpar reads format {FORMAT}")
    for name, (size, _) in files.items():
        f = path / name
        if not f.is_file():
            raise bad(f"is missing {name}")
        if f.stat().st_size != size:
            raise bad(f"file {name} has {f.stat().st_size} bytes, {size} were written: truncated or altered")
    try:
        _storage_reader(path).read_metadata()
    except Exception as e:
        detail = (str(e).strip().splitlines() or [""])[0][:120]
        raise bad(f"has an unreadable tensor index .metadata ({type(e).__name__}: {detail})") from None
    meta["step"] = step
    return meta


def model_config_of(meta: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in meta["model"].items() if k in fields})


def _engine(cfg: Config) -> dict:
    t = cfg.trainer
    return {"name": t.engine, "zero_stage": t.zero_stage or 1} if t.engine == "deepspeed" else {"name": t.engine}


def _engine_text(engine: dict) -> str:
    return " ".join([f"trainer.engine={engine['name']}"] + [f"trainer.zero_stage={v}" for k, v in engine.items()
                                                             if k == "zero_stage"])


def check_compatible(path: Path, meta: dict, cfg: Config) -> None:
    """The checkpoint must hold this model's architecture and this run's data order (seed, global batch and data
    settings); a DeepSpeed checkpoint needs the same engine, ZeRO stage and layout (its optimizer files are per
    data-parallel rank)."""
    saved_engine, engine = meta.get("engine", {"name": "seqpar"}), _engine(cfg)
    if saved_engine != engine:
        raise _bad(path, f"was written with {_engine_text(saved_engine)}, this run has {_engine_text(engine)}",
                   f"resume with {_engine_text(saved_engine)}, or start fresh in a new hydra.run.dir")
    if engine["name"] == "deepspeed" and meta["layout"] != _layout(cfg):
        saved = " ".join(f"parallel.{k}={v}" for k, v in meta["layout"].items() if k in ("dp", "sp", "sp_impl"))
        raise _bad(path, "is a DeepSpeed checkpoint of another layout (ZeRO saves one partition per rank)",
                   f"resume with {saved}, or start fresh in a new hydra.run.dir")
    saved, default = meta["model"], ModelConfig()
    for name in ARCH_FIELDS:
        want, there = getattr(cfg.model, name), saved.get(name, getattr(default, name))  # fields added later
        if name == "linformer_k" and cfg.model.attention != "linformer":
            continue
        if there != want:
            raise _bad(path, f"holds another model: model.{name} is {there} there, {want} here",
                       f"resume with the checkpoint's model settings (model.{name}={there}) or start fresh "
                       "(checkpoint.resume=never with a new hydra.run.dir)")
    loader = meta["loader"]
    for name in ("seed", "global_batch_size"):
        if loader[name] != getattr(cfg.trainer, name):
            raise _bad(path, f"was trained with trainer.{name}={loader[name]}, this run has {getattr(cfg.trainer, name)}",
                       f"resume with trainer.{name}={loader[name]}: the data position is counted in its batches")
    check_same_data(path, meta, cfg)


def _damage(e: UserError, path: Path) -> str:
    """What a failed check found, without the setting's name and the fix."""
    return e.problem.removeprefix(f"({path}) ")


def _data_settings(cfg: Config) -> dict:
    """The data settings that decide which sequences the loader's saved position counts (not the layout: dp and sp
    only split them)."""
    d = cfg.data
    out = {"source": d.source, "seq_len": d.seq_len, "val_fraction": d.val_fraction}
    if d.source == "text_files":
        out.update(paths=list(d.paths), sample_by=d.sample_by)
    elif d.source == "hf_dataset":
        out.update(hf_name=d.hf_name, hf_config=d.hf_config, hf_split=d.hf_split, text_column=d.text_column)
    return out


def _data_record(trainer) -> dict:
    """meta.json's `data`: the settings, and what they made: the tokenizer's vocabulary and the training set's size."""
    from seqpar.data.tokenizer import vocab_checksum

    record = {**_data_settings(trainer.cfg), "vocab_crc32": vocab_checksum(trainer.data.tokenizer),
              "train_sequences": len(trainer.data.train)}
    if getattr(trainer.data, "dataset_id", None):  # a prepared dataset: its manifest's id
        record["dataset_id"] = trainer.data.dataset_id
    return record


def _override(name: str, value) -> str:
    return f"data.{name}=[{','.join(value)}]" if isinstance(value, list) else f"data.{name}={value}"


def check_same_data(path: Path, meta: dict, cfg: Config) -> None:
    """The saved loader position (epoch, batch) means the same sequences only with the same data settings; a
    checkpoint written before meta.json recorded them (no `data` entry) is taken as it is."""
    saved = meta.get("data")
    if saved is None:
        return
    for name, value in _data_settings(cfg).items():
        if name in saved and saved[name] != value:
            raise _bad(path, f"was trained with {_override(name, saved[name])}, this run has {_override(name, value)}",
                       f"resume with {_override(name, saved[name])} (the saved data position counts the sequences "
                       "those settings make), or start fresh in a new hydra.run.dir")


def check_same_sequences(path: Path, meta: dict, data) -> None:
    """What the data settings made must match too: the tokenizer and the number of training sequences (a corpus
    whose files changed, another Python's built-in corpus, another tokenizer directory)."""
    from seqpar.data.tokenizer import vocab_checksum

    saved = meta.get("data")
    if saved is None:
        return
    if "vocab_crc32" in saved and saved["vocab_crc32"] != vocab_checksum(data.tokenizer):
        raise _bad(path, "was trained with another tokenizer (its vocabulary differs from this run's)",
                   f"resume with the checkpoint's tokenizer (data.tokenizer={path / 'tokenizer'}), or start fresh in "
                   "a new hydra.run.dir")
    if "train_sequences" in saved and saved["train_sequences"] != len(data.train):
        raise _bad(path, f"was trained on {saved['train_sequences']} training sequences, this run's data makes "
                   f"{len(data.train)}: the text changed", "resume on the data the run was trained on, or start fresh "
                   "in a new hydra.run.dir")
    here = getattr(data, "dataset_id", None)
    if "dataset_id" in saved and here is not None and saved["dataset_id"] != here:
        raise _bad(path, f"was trained on the prepared dataset {saved['dataset_id']}, this run's is {here} (other "
                   "data, or the same text prepared again)", "resume on the prepared data the run was trained on "
                   "(data.path), or start fresh in a new hydra.run.dir")


def find_resume(cfg: Config, passed_over: list[tuple[Path, str]] | None = None) -> Path | None:
    """The checkpoint this run continues from (meta.json, file sizes and compatibility checked), or None to start
    fresh. Raises UserError when a fresh start would overwrite checkpoints or the checkpoint is unusable.

    Under `auto` a damaged checkpoint (one that fails `read_meta`, or is already in `passed_over`) is passed over
    for the newest one that passes; each newly passed over is added to `passed_over` with what is wrong with it.
    Only when every checkpoint there is damaged does `auto` refuse. A checkpoint of another model or batch is
    refused, never passed over: an older one of the same run would not fit either."""
    mode = cfg.checkpoint.resume
    if mode not in ("auto", "never"):
        path = newest_if_root(Path(mode))
        check_compatible(path, read_meta(path), cfg)
        return path
    root = checkpoint_root(cfg)
    found = complete_checkpoints(root)
    if mode == "never":
        if found:
            raise UserError("checkpoint.resume", f"is never but {root} already holds checkpoints "
                              f"({found[-1].name}) that a fresh run would overwrite",
                              "use checkpoint.resume=auto to continue them, or a new hydra.run.dir / checkpoint.dir")
        return None
    passed_over = [] if passed_over is None else passed_over
    for path in reversed(found):
        if any(path == bad for bad, _ in passed_over):
            continue
        try:
            meta = read_meta(path)
        except UserError as e:
            passed_over.append((path, _damage(e, path)))
            continue
        check_compatible(path, meta, cfg)
        return path
    if found:
        newest, why = next((bad, why) for bad, why in passed_over if bad == found[-1])
        raise UserError("checkpoint.resume", f"is auto but no checkpoint in {root} passes its checks (the newest, "
                          f"{newest.name}: {why})", f"move the damaged step_* directories out of {root} to start "
                          "fresh there, or resume from a good copy (checkpoint.resume=<step_* dir>)")
    return None


def resume(trainer) -> Path | None:
    """Find, verify and load the checkpoint this run continues from (every rank calls it); None: a fresh start.

    Under `checkpoint.resume=auto` a checkpoint that fails its checks, the ranks' CRC-32 check included, is passed
    over for the next older one, and rank 0 says which and why on stderr. Checkpoints of this run's directory
    newer than the one resumed are then moved aside (`supersede`): the run's new history replaces them."""
    cfg = trainer.cfg
    passed_over: list[tuple[Path, str]] = []
    while (path := find_resume(cfg, passed_over)) is not None:
        meta = read_meta(path)
        check_same_sequences(path, meta, trainer.data)
        try:
            verify_files(path, meta)
        except UserError as e:
            if cfg.checkpoint.resume != "auto":
                raise
            passed_over.append((path, _damage(e, path)))  # every rank saw the same result (verify_files gathers)
            continue
        _restore(trainer, path, meta)
        break
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        for bad, why in passed_over:
            instead = f"resuming from {path.name} instead" if path else "no other checkpoint there"
            print(f"warning: checkpoint.resume=auto passes over {bad} ({why}); {instead}", file=sys.stderr,
                  flush=True)
    if path is not None:
        supersede(checkpoint_root(cfg), path, int(meta["step"]))
    return path


def supersede(root: Path, resumed: Path, step: int) -> None:
    """Move the checkpoints in `root` from `step` on (other than `resumed`) into `root/superseded/`, so that neither
    a save (which keeps an existing step) nor a later auto-resume mixes them with this run's new history. Nothing is
    deleted. Rank 0 moves; every rank learns the outcome together."""
    rank = dist.get_rank() if dist.is_initialized() else 0

    def move() -> None:
        later = sorted(p for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and int(m.group(1)) >= step
                       and p.resolve() != resumed.resolve()) if root.is_dir() else []
        if not later:
            return
        aside = root / "superseded"
        aside.mkdir(exist_ok=True)
        for p in later:
            target, n = aside / p.name, 1
            while target.exists():  # superseded before, by an earlier roll-back
                target, n = aside / f"{p.name}.{n}", n + 1
            os.rename(p, target)
        print(f"warning: moved {', '.join(p.name for p in later)} into {aside}: this run continues from {resumed} "
              f"(step {step}) and its new checkpoints replace them (nothing was deleted)", file=sys.stderr, flush=True)

    errors = _gather(_attempt(move) if rank == 0 else None)
    if errors[0]:
        raise UserError("checkpoint.dir", f"({root}) holds checkpoints newer than {resumed.name}, which this run "
                          f"continues from, and they could not be moved aside ({errors[0]})",
                          f"move them out of {root} yourself, then run the same command again")


# --- what is saved -------------------------------------------------------------------------------------------

def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in state_by_name(model).items()}


def _param_names(model: nn.Module) -> dict[nn.Parameter, list[str]]:
    names: dict[nn.Parameter, list[str]] = {}
    for k, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(k.replace(WRAPPER, ""))
    return names


def _optim_state(optimizer: torch.optim.Optimizer, model: nn.Module, empty: bool) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state by parameter name; `empty`: zero templates of the right shape (for loading)."""
    out = {}
    for p, names in _param_names(model).items():
        state = {} if empty else optimizer.state.get(p, {})
        if not state:  # a template to load into, or a parameter no step has updated yet
            state = {"exp_avg": torch.zeros_like(p.data), "exp_avg_sq": torch.zeros_like(p.data),
                     "step": torch.zeros((), dtype=torch.float32)}
        for name in names:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                out[f"optim.{name}.{key}"] = state[key]
    return out


def load_optim_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give the optimizer the loaded AdamW state (`optim.<name>.*`) through `Optimizer.load_state_dict`, which puts
    each tensor where torch keeps it: the moments on the parameter's device and dtype, and `step` on the
    parameter's device for the fused and capturable kernels (on CUDA they fail on a CPU step)."""
    names = _param_names(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict()'s index order
    per_param = {i: {k: state[f"optim.{names[p][0]}.{k}"] for k in ("exp_avg", "exp_avg_sq", "step")}
                 for i, p in enumerate(params)}
    optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})


def _rng_state(rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    out = {f"rng.rank{rank}.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out[f"rng.rank{rank}.cuda"] = torch.cuda.get_rng_state(device)
    return out


def _layout(cfg: Config) -> dict:
    return {k: getattr(cfg.parallel, k) for k in LAYOUT_FIELDS}


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it runs without a process group, which is what one process means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _world_barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (disk full, say). Every rank raises it at the same point of `save`, so
    none waits for a peer that gave up; nothing was published and the partial files are removed."""


def _describe(e: BaseException) -> str:
    """One line for a failure; DCP's CheckpointException shows the first failing rank's own error."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = min(failures.items())[1][0]
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _attempt(fn, *args) -> str | None:
    """Run `fn`; its failure as one line instead of an exception (DCP's is a BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        fn(*args)
    except (Exception, CheckpointException) as e:
        return _describe(e)
    return None


def _agree(error: str | None, root: Path, step: int, tmp: Path) -> None:
    """Every rank says how its part went (a collective, so also a barrier); if any failed, all raise SaveFailed
    with the first failure, after rank 0 removed the partial checkpoint."""
    errors = _gather(error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _world_barrier()  # the partial files are gone when any rank goes on (rmtree above cannot raise)
    where = f"rank {failed[0][0]}: " if len(errors) > 1 else ""
    raise SaveFailed(f"checkpoint.dir ({root}) could not take the checkpoint of step {step} ({where}{failed[0][1]})")


def _write_meta(tmp: Path, meta: dict) -> None:
    with open(tmp / META, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def save(trainer, reason: str = "periodic") -> Path | None:
    """Write a checkpoint of the trainer's current step (every rank calls it). Returns its path.

    Each phase ends with every rank agreeing on its outcome (`_agree`): rank 0's preparation, every rank's write,
    rank 0's meta.json and publication. A failure anywhere raises SaveFailed on every rank together."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    cfg, step = trainer.cfg, trainer.step
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    root = checkpoint_root(cfg)
    final, tmp = root / step_name(step), root / f".tmp-{step_name(step)}"
    if final.exists():
        return None  # this step is saved already (a resumed run that ends where it started)

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by an interrupted save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()

    _agree(_attempt(prepare) if rank == 0 else None, root, step, tmp)
    deepspeed = trainer.engine.name == "deepspeed"
    mine: dict[str, list[int]] = {}

    def write() -> None:
        state = _rng_state(rank, trainer.device)
        if not deepspeed:
            state.update(_model_state(trainer.model))
            state.update(_optim_state(trainer.optimizer, trainer.model, empty=False))
        with _single_process_quiet():
            dcp.save(state, storage_writer=FileSystemWriter(str(tmp), sync_files=True),
                     no_dist=not dist.is_initialized())
        mine.update({p.name: [p.stat().st_size, _crc(p)] for p in tmp.glob(f"__{rank}_*")})
        if deepspeed:
            trainer.engine.save(str(tmp))  # DeepSpeed's own files, under deepspeed/

    _agree(_attempt(write), root, step, tmp)  # every rank's files are written

    def checksum_deepspeed() -> None:  # each rank a share of DeepSpeed's files
        names = sorted(str(f.relative_to(tmp)) for f in (tmp / DEEPSPEED_DIR).rglob("*") if f.is_file())
        mine.update({n: [(tmp / n).stat().st_size, _crc(tmp / n)] for i, n in enumerate(names) if i % world == rank})

    if deepspeed:
        _agree(_attempt(checksum_deepspeed), root, step, tmp)
    files = {k: v for part in _gather(mine) for k, v in part.items()}

    def publish() -> None:
        files[".metadata"] = [(tmp / ".metadata").stat().st_size, _crc(tmp / ".metadata")]
        trainer.data.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        _write_meta(tmp, {
            "format": FORMAT,
            "step": step,
            "reason": reason,
            "model": dataclasses.asdict(cfg.model),
            "layout": _layout(cfg),
            "engine": _engine(cfg),
            "loader": trainer.loader.state_dict(),
            "data": _data_record(trainer),
            "scheduler": {k: v for k, v in trainer.scheduler.state_dict().items() if k != "lr_lambdas"},
            "bad_steps": trainer.bad_steps,
            "skipped_steps": trainer.skipped_steps,
            "files": files,
        })
        os.rename(tmp, final)  # publish: atomic on one file system
        _fsync_dir(root)

    _agree(_attempt(publish) if rank == 0 else None, root, step, tmp)
    if rank == 0:
        problem = _attempt(_prune, root, cfg.checkpoint.keep)  # the new checkpoint stands either way
        if problem:
            print(f"warning: checkpoint.keep: could not remove old checkpoints in {root} ({problem})",
                  file=sys.stderr, flush=True)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (unpublishing each before deleting its files)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(root)[:-keep]:
        doomed = old.with_name(f".tmp-deleting-{old.name}")
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def verify_files(path: Path, meta: dict, field_name: str = "checkpoint.resume", *fix: str) -> None:
    """Every rank checks the CRC-32 of a share of the files; any mismatch fails every rank with its name."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    names = sorted(meta["files"])
    bad = [n for i, n in enumerate(names) if i % world == rank and _crc(path / n) != meta["files"][n][1]]
    bad = sorted(n for part in _gather(bad) for n in part)
    if bad:
        raise _bad(path, f"file {bad[0]} does not match its recorded checksum: the checkpoint is corrupted", *fix,
                   field_name=field_name)


def _restore(trainer, path: Path, meta: dict) -> None:
    """Load the checked checkpoint `path` into the trainer."""
    import torch.distributed.checkpoint as dcp

    cfg = trainer.cfg
    rank = dist.get_rank() if dist.is_initialized() else 0
    same_layout = meta["layout"] == _layout(cfg)
    deepspeed = trainer.engine.name == "deepspeed"
    state = {} if deepspeed else {**_model_state(trainer.model), **_optim_state(trainer.optimizer, trainer.model, empty=True)}
    if same_layout:
        state.update(_rng_state(rank, trainer.device))
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=_storage_reader(path), no_dist=not dist.is_initialized())
    except Exception as e:
        first = str(e).strip().splitlines()
        raise _bad(path, f"could not be loaded into this model ({type(e).__name__}: "
                   f"{first[0][:200] if first else ''})") from None
    if deepspeed:
        with _deepspeed_files(path, "checkpoint.resume"):
            trainer.engine.load(str(path))  # weights and ZeRO's optimizer partitions, read weights-only
    else:
        load_optim_state(trainer.optimizer, trainer.model, state)
    sched = dict(meta["scheduler"], lr_lambdas=[None] * len(trainer.optimizer.param_groups))
    trainer.scheduler.load_state_dict(sched)
    for group, lr in zip(trainer.optimizer.param_groups, trainer.scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    trainer.loader.load_state_dict(meta["loader"])
    if same_layout:
        torch.set_rng_state(state[f"rng.rank{rank}.cpu"])
        if trainer.device.type == "cuda":
            torch.cuda.set_rng_state(state[f"rng.rank{rank}.cuda"], trainer.device)
    trainer.step = meta["step"]
    trainer.bad_steps, trainer.skipped_steps = meta["bad_steps"], meta["skipped_steps"]


@contextlib.contextmanager
def _deepspeed_files(path: Path, field_name: str):
    """DeepSpeed reads its own files, weights-only (`engine.weights_only_loads`); a file holding anything else
    (a crafted pickle) becomes one `error:` line naming what it holds."""
    try:
        yield
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise _bad(path, f"has a DeepSpeed file holding an object seqpar does not unpickle{what}: crafted, or "
                   "written by another program", "use only checkpoints written by seqpar's trainer.engine=deepspeed",
                   field_name=field_name) from None


def load_model_weights(path: Path, model: nn.Module, meta: dict, field_name: str = "checkpoint") -> None:
    """Only the model's weights from a checkpoint, in one process (for export). `meta` (from `read_meta`, its files
    checked with `verify_files`) says which engine wrote it: a `deepspeed/` folder alone never makes DeepSpeed read
    anything."""
    import torch.distributed.checkpoint as dcp

    if meta.get("engine", {}).get("name") == "deepspeed":
        from seqpar.trainer.engine import zero_fp32_state_dict

        with _deepspeed_files(path, field_name):
            state = zero_fp32_state_dict(str(path))
        model.load_state_dict({k.replace(WRAPPER, ""): v for k, v in state.items()}, strict=False)
        return
    state = _model_state(model)
    with _single_process_quiet():
        dcp.load(state, storage_reader=_storage_reader(path), no_dist=True)
