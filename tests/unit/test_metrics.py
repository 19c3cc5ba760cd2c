"""MFU's denominator: the device's peak for the precision the run computes in."""

from __future__ import annotations

import pytest
import torch

from seqpar.trainer.metrics import PEAK_FLOPS, device_peak_flops


@pytest.mark.parametrize("gpu,precision,matmul,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", "highest", 989e12),
    ("NVIDIA H100 80GB HBM3", "fp32", "highest", 67e12),  # fp32 matmuls on the CUDA cores, torch's default
    ("NVIDIA H100 80GB HBM3", "fp32", "high", 494.5e12),  # ... or as TF32 on the tensor cores
    ("NVIDIA A100-SXM4-80GB", "fp32", "highest", 19.5e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", "high", 312e12),  # bf16 autocast is bf16 whatever the fp32 setting
])
def test_mfu_peak_follows_the_runs_precision(monkeypatch, gpu, precision, matmul, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: matmul)
    assert device_peak_flops(torch.device("cuda", 0), None, precision) == peak


def test_a_configured_peak_wins_and_unknown_devices_have_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert device_peak_flops(torch.device("cuda", 0), 1e12, "fp32") == 1e12
    assert device_peak_flops(torch.device("cuda", 0), None, "fp32") is None
    assert device_peak_flops(torch.device("cpu"), None, "bf16") is None


def test_every_recognised_gpu_has_a_peak_for_every_precision():
    assert PEAK_FLOPS["bf16"].keys() == PEAK_FLOPS["fp32"].keys() == PEAK_FLOPS["tf32"].keys()
    for name in PEAK_FLOPS["bf16"]:  # tensor cores at 16 bits >= TF32 >= the CUDA cores' fp32
        assert PEAK_FLOPS["bf16"][name] >= PEAK_FLOPS["tf32"][name] >= PEAK_FLOPS["fp32"][name], name
