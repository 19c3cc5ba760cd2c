"""The data section: the source and its settings, the sequence length against the model, document masking."""

from __future__ import annotations

from seqpar.config import DATA_SOURCES, DOCUMENT_POSITIONS, DataConfig, ModelConfig
from seqpar.errors import UserError
from seqpar.validation.fields import choice, fraction, positive


def validate_data(d: DataConfig, m: ModelConfig) -> None:
    choice("data.source", d.source, DATA_SOURCES)
    choice("data.sample_by", d.sample_by, ("line", "paragraph", "document"))
    if d.source == "text_files" and not d.paths:
        raise UserError("data.paths", "is empty for data.source=text_files", "pass data.paths=[file1.txt,dir/*.txt]")
    if d.source == "hf_dataset" and not d.hf_name:
        raise UserError("data.hf_name", "is not set for data.source=hf_dataset", "pass data.hf_name=<dataset name or path>")
    positive("data.seq_len", d.seq_len)
    if d.seq_len < 4:
        raise UserError("data.seq_len", f"is {d.seq_len}, too short to train on", "use data.seq_len >= 4")
    if d.seq_len > m.max_seq_len and m.arch != "llama":  # Llama's rotary positions have no table to outgrow
        raise UserError(
            "data.seq_len",
            f"({d.seq_len}) is longer than model.max_seq_len ({m.max_seq_len}), the model's learned positions",
            f"lower data.seq_len or raise model.max_seq_len to at least {d.seq_len}",
        )
    fraction("data.val_fraction", d.val_fraction, lo_open=True, hi=0.5)
    fraction("data.mlm_probability", d.mlm_probability, lo_open=True)
    if d.num_proc is not None:
        positive("data.num_proc", d.num_proc)
    positive("data.tokenizer_sample_mib", d.tokenizer_sample_mib)
    positive("data.shard_tokens", d.shard_tokens)
    if d.streaming and d.source != "hf_dataset":
        raise UserError("data.streaming", f"is true with data.source={d.source}; only hub datasets stream",
                        "use data=hf_dataset data.streaming=true, or drop data.streaming")
    if d.sources:
        if d.source != "prepared" or d.path:
            raise UserError("data.sources", f"is set with data.source={d.source}" + (" and data.path" if d.path else ""),
                            "blend prepared directories with data=prepared data.sources=[...] and no data.path")
        for i, src in enumerate(d.sources):
            if not src.path:
                raise UserError(f"data.sources[{i}].path", "is empty", "give each source the path of a prepared directory")
            positive(f"data.sources[{i}].weight", src.weight)
    elif d.source == "prepared" and not d.path:
        raise UserError("data.path", "is not set for data.source=prepared",
                        "pass data.path=<the --out directory of python -m seqpar.prepare> (or data.sources=[...])")
    validate_documents(d, m)


def validate_documents(d: DataConfig, m: ModelConfig) -> None:
    """Document masking and positions: for the packed token stream of GPT and Llama only."""
    if d.document_positions is not None:
        choice("data.document_positions", d.document_positions, DOCUMENT_POSITIONS)
    if d.document_mask and m.attention != "softmax":
        raise UserError("data.document_mask", f"is true with model.attention={m.attention}, whose projected keys "
                        "mix positions of every document", "use model.attention=softmax or data.document_mask=false")
    if not m.causal and (d.document_mask or d.document_positions is not None):
        name = "data.document_mask" if d.document_mask else "data.document_positions"
        raise UserError(name, f"is set with model.arch={m.arch}, whose windows are packed and padded, not cut from "
                        "a stream of documents", f"drop {name} (GPT and Llama only)")
