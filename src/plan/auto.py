"""parallel=auto: the layout a job runs with, chosen from the planner's estimate before any process starts.

`seqpar.preflight.prepare` calls `choose_layout` once per job. `available_devices` says what the job has (devices,
memory per device, device type), from the config, the launcher's world size or this machine; `choose_layout`
ranks every layout of those devices with `seqpar.plan.estimate.plan` and returns the config with the first that
fits (and its micro-batch), saying on rank 0 what it chose and why. When none fits the config as given, it turns on
the memory settings the config leaves unset, cheapest first, until one does (`seqpar.plan.memory`).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from seqpar.config import Config
from seqpar.errors import UserError
from seqpar.parallel.launch import launched_rank, resolve_device
from seqpar.plan.memory import Fit, fit_with_memory_settings, kept_settings


def available_devices(cfg: Config) -> tuple[int, float, str]:
    """(devices, GiB per device, device type) for parallel=auto: parallel.devices, else the launcher's world size
    (torchrun, srun), else the GPUs visible here, else the CPU cores; memory: parallel.device_mem_gib, else the
    GPU's, else this machine's RAM shared by the devices."""
    device = resolve_device(cfg.device).type
    p = cfg.parallel
    launched = launched_rank()
    n = p.devices or (launched.world if launched else None)
    if n is None:
        n = torch.cuda.device_count() if device == "cuda" else (os.cpu_count() or 1)
    if p.device_mem_gib:
        mem = p.device_mem_gib
    elif device == "cuda":
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        with open("/proc/meminfo") as f:  # MemTotal: the same on every rank and every run
            total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        mem = total_kib / 2**20 / n
    return n, mem, device


def choose_layout(cfg: Config) -> Config:
    """parallel=auto: the config with the fastest layout (and micro-batch) that fits the available devices, by the
    planner's estimate, with the fewest memory settings turned on that it takes (`seqpar.plan.memory`); says what
    it chose and why on stdout (rank 0 only)."""
    n, mem, device = available_devices(cfg)
    speed = {"cuda": (400.0, 100.0), "cpu": (0.1, 2.0)}[device]  # TFLOP/s, GB/s: only the ranking uses them
    micro = cfg.trainer.micro_batch_size
    fit = fit_with_memory_settings(cfg, n, mem, device, *speed,
                                   accept=lambda e: micro is None or e.pp > 1 or e.micro_batch_size == micro)
    if not fit.fitting:
        raise _nothing_fits(cfg, fit, n, mem)
    best, rows = fit.fitting[0], fit.rows
    p = dataclasses.replace(cfg.parallel, dp=best.dp, pp=best.pp, tp=best.tp, sp=best.sp, auto=False,
                            devices=None, device_mem_gib=None)
    t = fit.cfg.trainer
    if best.pp == 1 and micro is None and best.micro_batch_size < t.global_batch_size // best.dp:
        t = dataclasses.replace(t, micro_batch_size=best.micro_batch_size)
    why = (f"parallel=auto: dp={best.dp} pp={best.pp} tp={best.tp} sp={best.sp}"
           + (f" micro_batch_size={best.micro_batch_size}" if best.pp == 1 else f" microbatches={p.microbatches}")
           + "".join(f" {o}" for o in fit.turned_on)
           + f" on {n} {device} devices: estimated {best.peak_mib / 1024:.2f} of {mem:.1f} GiB per device, "
           f"the shortest estimated step (then the largest micro-batch) of {len(fit.fitting)} choices that fit "
           f"({len(rows) - len(fit.fitting)} do not; see python -m seqpar.plan)"
           + (f"; turned on {fit.why()}" if fit.turned_on else ""))
    info = launched_rank()
    if info is None or info.rank == 0:  # prepare() runs once per job (the preflight's result is passed on)
        print(why, flush=True)
    return dataclasses.replace(cfg, parallel=p, trainer=t)


def _nothing_fits(cfg: Config, fit: Fit, n: int, mem: float) -> UserError:
    """The error when not even the last memory setting tried makes a layout fit: what was tried, what was kept as
    the config sets it, and what is left to the user."""
    least = min(fit.rows, key=lambda e: e.peak_mib, default=None)
    need = f"the smallest needs {least.peak_mib / 1024:.2f} GiB ({least.layout})" if least else "none is valid"
    tried = f", even with {' '.join(fit.turned_on)}" if fit.turned_on else ""
    kept = kept_settings(cfg)
    kept_note = f", with {' '.join(kept)} as set" if kept else ""
    t = fit.cfg.trainer
    left = [o for o, on in (("trainer.activation_checkpointing=true", t.activation_checkpointing),
                            ("trainer.tiled_mlp=true", t.tiled_mlp)) if not on]
    return UserError(
        "parallel.auto",
        f"finds no layout of {n} devices that fits {mem:.1f} GiB per device ({need}){tried}{kept_note}",
        "use more devices (parallel.devices), " + "".join(f"{o}, " for o in left)
        + "a smaller trainer.micro_batch_size or data.seq_len",
    )
