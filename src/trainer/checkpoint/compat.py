"""Whether a checkpoint fits this run: the same model architecture, seed and global batch, data settings (and the
sequences they made), and for DeepSpeed the same engine, ZeRO stage and layout. Also what meta.json records of the
run for these checks (`layout`, `engine_record`, `data_record`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from seqpar.config import Config, ModelConfig
from seqpar.data.tokenizer import vocab_checksum
from seqpar.trainer.checkpoint.files import bad

# The architecture a checkpoint's tensors belong to (dropout, name and init_from may differ on resume).
ARCH_FIELDS = ("arch", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "vocab_size", "max_seq_len",
               "activation", "type_vocab_size", "attention", "linformer_k", "num_kv_heads", "rope_theta", "qkv_bias",
               "tie_embeddings")
LAYOUT_FIELDS = ("dp", "pp", "tp", "sp", "sp_impl", "pp_schedule", "microbatches")


def layout(cfg: Config) -> dict:
    return {k: getattr(cfg.parallel, k) for k in LAYOUT_FIELDS}


def engine_record(cfg: Config) -> dict:
    t = cfg.trainer
    return {"name": t.engine, "zero_stage": t.zero_stage or 1} if t.engine == "deepspeed" else {"name": t.engine}


def _engine_text(engine: dict) -> str:
    return " ".join([f"trainer.engine={engine['name']}"] + [f"trainer.zero_stage={v}" for k, v in engine.items()
                                                             if k == "zero_stage"])


def model_config_of(meta: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in meta["model"].items() if k in fields})


def check_compatible(path: Path, meta: dict, cfg: Config) -> None:
    """The checkpoint must hold this model's architecture and this run's data order (seed, global batch and data
    settings); a DeepSpeed checkpoint needs the same engine, ZeRO stage and layout (its optimizer files are per
    data-parallel rank)."""
    saved_engine, engine = meta.get("engine", {"name": "seqpar"}), engine_record(cfg)
    if saved_engine != engine:
        raise bad(path, f"was written with {_engine_text(saved_engine)}, this run has {_engine_text(engine)}",
                  f"resume with {_engine_text(saved_engine)}, or start fresh in a new hydra.run.dir")
    if engine["name"] == "deepspeed" and meta["layout"] != layout(cfg):
        saved = " ".join(f"parallel.{k}={v}" for k, v in meta["layout"].items() if k in ("dp", "sp", "sp_impl"))
        raise bad(path, "is a DeepSpeed checkpoint of another layout (ZeRO saves one partition per rank)",
                  f"resume with {saved}, or start fresh in a new hydra.run.dir")
    saved, default = meta["model"], ModelConfig()
    for name in ARCH_FIELDS:
        want, there = getattr(cfg.model, name), saved.get(name, getattr(default, name))  # fields added later
        if name == "linformer_k" and cfg.model.attention != "linformer":
            continue
        if there != want:
            raise bad(path, f"holds another model: model.{name} is {there} there, {want} here",
                      f"resume with the checkpoint's model settings (model.{name}={there}) or start fresh "
                      "(checkpoint.resume=never with a new hydra.run.dir)")
    loader = meta["loader"]
    for name in ("seed", "global_batch_size"):
        if loader[name] != getattr(cfg.trainer, name):
            raise bad(path, f"was trained with trainer.{name}={loader[name]}, this run has "
                      f"{getattr(cfg.trainer, name)}",
                      f"resume with trainer.{name}={loader[name]}: the data position is counted in its batches")
    check_same_data(path, meta, cfg)


def data_settings(cfg: Config) -> dict:
    """The data settings that decide which sequences the loader's saved position counts (not the layout: dp and sp
    only split them)."""
    d = cfg.data
    out = {"source": d.source, "seq_len": d.seq_len, "val_fraction": d.val_fraction}
    if d.source == "text_files":
        out.update(paths=list(d.paths), sample_by=d.sample_by)
    elif d.source == "hf_dataset":
        out.update(hf_name=d.hf_name, hf_config=d.hf_config, hf_split=d.hf_split, text_column=d.text_column)
    return out


def sequences_record(data) -> dict:
    """What the data settings made (`data`: the run's SequenceData): the tokenizer's vocabulary and the training
    set's size."""
    record = {"vocab_crc32": vocab_checksum(data.tokenizer), "train_sequences": len(data.train)}
    if getattr(data, "dataset_id", None):  # a prepared dataset: its manifest's id
        record["dataset_id"] = data.dataset_id
    return record


def data_record(cfg: Config, data) -> dict:
    """meta.json's `data`: the settings, and what they made."""
    return {**data_settings(cfg), **sequences_record(data)}


def _override(name: str, value) -> str:
    return f"data.{name}=[{','.join(value)}]" if isinstance(value, list) else f"data.{name}={value}"


def check_same_data(path: Path, meta: dict, cfg: Config) -> None:
    """The saved loader position (epoch, batch) means the same sequences only with the same data settings; a
    checkpoint written before meta.json recorded them (no `data` entry) is taken as it is."""
    saved = meta.get("data")
    if saved is None:
        return
    for name, value in data_settings(cfg).items():
        if name in saved and saved[name] != value:
            raise bad(path, f"was trained with {_override(name, saved[name])}, this run has {_override(name, value)}",
                      f"resume with {_override(name, saved[name])} (the saved data position counts the sequences "
                      "those settings make), or start fresh in a new hydra.run.dir")


def check_same_sequences(path: Path, meta: dict, record: dict) -> None:
    """What the data settings made must match too (`record`: this run's `sequences_record` or `data_record`): the
    tokenizer and the number of training sequences (a corpus whose files changed, another Python's built-in corpus,
    another tokenizer directory)."""
    saved = meta.get("data")
    if saved is None:
        return
    if "vocab_crc32" in saved and saved["vocab_crc32"] != record["vocab_crc32"]:
        raise bad(path, "was trained with another tokenizer (its vocabulary differs from this run's)",
                  f"resume with the checkpoint's tokenizer (data.tokenizer={path / 'tokenizer'}), or start fresh in "
                  "a new hydra.run.dir")
    if "train_sequences" in saved and saved["train_sequences"] != record["train_sequences"]:
        raise bad(path, f"was trained on {saved['train_sequences']} training sequences, this run's data makes "
                  f"{record['train_sequences']}: the text changed", "resume on the data the run was trained on, or "
                  "start fresh in a new hydra.run.dir")
    here = record.get("dataset_id")
    if "dataset_id" in saved and here is not None and saved["dataset_id"] != here:
        raise bad(path, f"was trained on the prepared dataset {saved['dataset_id']}, this run's is {here} (other "
                  "data, or the same text prepared again)", "resume on the prepared data the run was trained on "
                  "(data.path), or start fresh in a new hydra.run.dir")
