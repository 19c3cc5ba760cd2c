"""A prepared job on the ranks it needs: `launch_job(job)` starts them (or joins torchrun/srun's), and `run_rank`
trains as one of them."""

from __future__ import annotations

from seqpar.config import data_view
from seqpar.data.sequences import BuiltSequences
from seqpar.parallel.launch import launch, launched_rank, resolve_device, start_method
from seqpar.parallel.mesh import ParallelMesh
from seqpar.parallel.signals import StopSignal
from seqpar.preflight import Job
from seqpar.trainer.engine import import_deepspeed
from seqpar.trainer.loop import Trainer


def run_rank(job: Job, data=None, stop: StopSignal | None = None) -> dict:
    """Train the prepared job as this rank (torch.distributed already initialised when there are several);
    returns the last logged record. `data`: the SequenceData the launcher's parent built, if it did; `stop`: the
    preemption signal recorded for this rank so far."""
    mesh = ParallelMesh.from_config(job.cfg.parallel, resolve_device(job.cfg.device))
    return Trainer(job.cfg, mesh, data, resume=job.resume).fit(stop)


def launch_job(job: Job, built: BuiltSequences | None = None) -> None:
    """Run a prepared job on every rank it needs: in this process, as a torchrun/srun rank, or on local processes
    started here. Local CPU ranks are forked from this process after it has built the data once, so they start
    without loading anything again; `built` keeps the data for the next job of a multirun."""
    cfg = job.cfg
    device = resolve_device(cfg.device)
    world = cfg.parallel.world_size
    data = None
    if launched_rank() is None and (world == 1 or start_method(device.type) == "fork"):
        data = (built or BuiltSequences()).get(data_view(cfg))
        if cfg.trainer.save_final:  # rank 0 writes transformers' files: import its config classes once, here
            from transformers import BertConfig, GenerationConfig, GPT2Config  # noqa: F401
        if cfg.trainer.engine == "deepspeed":  # a second or more per rank when each imports it
            import_deepspeed()
    stop = StopSignal()
    launch(run_rank, world, job, data, stop, device_type=device.type, timeout_s=cfg.parallel.timeout_s, stop=stop)
