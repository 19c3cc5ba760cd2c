"""What a step costs: peak memory, model FLOPs per token and, where the device's peak is known, MFU; and the
record of logged steps that metrics.jsonl holds (`StepRecords`)."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
from torch import nn

from seqpar.config import Config, ModelConfig
from seqpar.models import build_model
from seqpar.parallel.mesh import ParallelMesh

# Dense peak FLOP/s per device of known GPUs, for MFU, from NVIDIA's data sheets (H100 and H200: the SXM parts; A10G:
# the A10's; RTX 4090: the Ada whitepaper), without sparsity. "bf16": tensor cores with fp32 accumulation. "fp32":
# the CUDA cores, which fp32 matmuls use while torch's float32 matmul precision is "highest" (its default);
# "tf32": tensor cores, which they use once it is set to "high" or "medium" (torch.set_float32_matmul_precision).
PEAK_FLOPS = {
    "bf16": {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12},
    "tf32": {"H100": 494.5e12, "H200": 494.5e12, "A100": 156e12, "L40S": 183e12, "A10G": 62.5e12, "RTX 4090": 82.6e12},
    "fp32": {"H100": 67e12, "H200": 67e12, "A100": 19.5e12, "L40S": 91.6e12, "A10G": 31.2e12, "RTX 4090": 82.6e12},
}


def reset_peak_mem(device: torch.device) -> None:
    """Start counting the peak afresh (a trainer's own peak, not an earlier job's of the same process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: the resident high-water mark (VmHWM) restarts from the current resident set
    except OSError:
        pass


def peak_mem_mib(device: torch.device) -> float:
    """Peak memory of this process: the CUDA allocator's peak on GPU; on CPU the peak resident set (since the last
    `reset_peak_mem` on Linux, which includes the libraries and data the process holds)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_reserved_mib(device: torch.device) -> float | None:
    """The CUDA caching allocator's peak of reserved memory (the allocated peak plus what it kept cached and
    fragmented), or None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / 2**20


def device_peak_flops(device: torch.device, configured: float | None, precision: str) -> float | None:
    """The peak MFU divides by: `trainer.peak_flops` if set, else the known GPU's dense peak for the run's
    `trainer.precision` (fp32 on tensor cores as TF32 where torch's float32 matmul precision allows it)."""
    if configured:
        return configured
    if device.type != "cuda":
        return None
    if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
        precision = "tf32"
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS[precision].items() if key in name), None)


def flops_per_token(model: nn.Module, cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's 12 * layers * hidden * seq_len.

    Weights count the tied embedding once (it is the output layer's matmul) and leave out position embeddings,
    which are a lookup. This is the usual PaLM/Megatron estimate; causal attention is not halved.
    """
    lookups = set(model.layout.position_params)
    n = sum(p.numel() for name, p in model.named_parameters() if name not in lookups)
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len


class StepRecords:
    """metrics.jsonl's training lines: what the loop measured (the losses of the steps since the last record, the
    learning rate, the gradient norm, the time they took) with the run's totals and costs: tokens, throughput, the
    peak memory of every rank (every rank must call `record`), skipped steps, MFU where the device's peak is known,
    and a blend's tokens per source."""

    def __init__(self, cfg: Config, mesh: ParallelMesh, train_data, loader):
        t = cfg.trainer
        self.mesh, self.train_data, self.loader = mesh, train_data, loader
        self.seq_len, self.global_batch_size = cfg.data.seq_len, t.global_batch_size
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(build_model(cfg.model, "meta"), cfg.model, cfg.data.seq_len)  # whole
        self.peak_flops = device_peak_flops(mesh.device, t.peak_flops, t.precision)

    def record(self, step: int, losses: list[float], lr: float, grad_norm: float, elapsed: float, steps: int,
               skipped_steps: int) -> dict:
        """The record at `step`, the last of the `steps` steps (with `losses`) that took `elapsed` seconds."""
        tokens_per_s = self.tokens_per_step * steps / elapsed
        rec = {
            "step": step,
            "loss": sum(losses) / len(losses),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step * self.tokens_per_step,
            "tokens_per_s": tokens_per_s,
        }
        if hasattr(self.train_data, "sequences_by_source"):  # a blend: tokens read from each source so far
            read = self.train_data.sequences_by_source(self.loader.epoch, self.loader.step * self.global_batch_size)
            for name, n in read.items():
                rec[f"tokens/{name}"] = n * self.seq_len
        per_rank = self.mesh.gather_over_all(peak_mem_mib(self.mesh.device))
        rec["peak_mem_mib"] = max(per_rank)
        if len(per_rank) > 1:
            rec["peak_mem_mib_per_rank"] = per_rank
        if self.mesh.device.type == "cuda":  # beside the allocated peak: what the caching allocator held
            rec["peak_reserved_mib"] = max(self.mesh.gather_over_all(peak_reserved_mib(self.mesh.device)))
        if skipped_steps:
            rec["skipped_steps"] = skipped_steps
        if self.peak_flops:
            rec["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.mesh.world_size)
        return rec


def _record_of(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # a line the stopped run left half-written
        return None
    return record if isinstance(record, dict) else None


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records after `step` from a run's metrics (a resumed run logs those steps again), and any line a
    killed run left half-written."""
    if not path.is_file():
        return
    kept = [line.rstrip("\n") + "\n" for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if (record := _record_of(line)) is not None and record.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)
