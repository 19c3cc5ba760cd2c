"""What a step costs: peak memory, model FLOPs per token and, where the device's peak is known, MFU."""

from __future__ import annotations

import resource

import torch
from torch import nn

from seqpar.config import ModelConfig

# Dense bf16 peak FLOP/s of known accelerators (per device), for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12}


def peak_mem_mib(device: torch.device) -> float:
    """Peak memory of this process: the CUDA allocator's peak on GPU, the peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def device_peak_flops(device: torch.device, configured: float | None) -> float | None:
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops
    return None


def flops_per_token(model: nn.Module, cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's 12 * layers * hidden * seq_len.

    Weights count the tied embedding once (it is the output layer's matmul) and leave out position embeddings,
    which are a lookup. This is the usual PaLM/Megatron estimate; causal attention is not halved.
    """
    n = sum(p.numel() for name, p in model.named_parameters() if "position" not in name and "wpe" not in name)
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len
