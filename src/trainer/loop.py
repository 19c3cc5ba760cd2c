"""The training loop: build everything from the config and a mesh, train, evaluate, log, save.

The loss of a step is the mean over every target token of the global batch: each micro-batch contributes its summed
cross-entropy divided by the global target count (summed over the dp x sp ranks), and gradients are summed over
those ranks, so gradient accumulation, data parallelism and sequence chunks all give the same loss and gradients as
one process with the whole batch. What a step computes on a rank's batch (its sequence chunk, micro-batches and
their summed losses) is `seqpar.trainer.step`'s; the logged records are `seqpar.trainer.metrics.StepRecords`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from seqpar.config import Config
from seqpar.data.build import build_data
from seqpar.data.loader import GlobalBatchLoader, eval_batches
from seqpar.data.mlm import IGNORE_INDEX
from seqpar.data.tokenizer import vocab_checksum
from seqpar.errors import UserError
from seqpar.models import MODELS
from seqpar.models.hf import not_exportable, save_pretrained
from seqpar.parallel.mesh import ParallelMesh
from seqpar.parallel.signals import StopSignal
from seqpar.parallel.tensor import loss_context
from seqpar.trainer.checkpoint import (
    CheckpointManager,
    ResumePoint,
    SaveFailed,
    TrainState,
    data_record,
    training_states,
)
from seqpar.trainer.engine import DeepSpeedEngine, SeqparEngine
from seqpar.trainer.loggers import build_loggers
from seqpar.trainer.loss import loss_sum, output_loss_sum
from seqpar.trainer.metrics import StepRecords, reset_peak_mem, trim_metrics
from seqpar.trainer.optim import build_optimizer, build_scheduler
from seqpar.trainer.progress import Progress
from seqpar.trainer.step import MODEL_INPUTS, holds_loss, micro_batches, model_loss_sum, sequence_chunk
from seqpar.trainer.weights import build_rank_model, full_tensor, gather_model


class TrainingAborted(RuntimeError):
    """Training cannot go on (the loss stayed non-finite); the message says why and what to do."""

    exit_code = 3


def check_same_data(data, mesh: ParallelMesh) -> None:
    """Every rank must tokenize with the same vocabulary and see the same sequences. A cache that is not shared
    between nodes would otherwise train a tokenizer per node (training breaks ties differently run to run)."""
    if not mesh.all_equal(vocab_checksum(data.tokenizer) * 1_000_003 + len(data.train)):
        raise UserError(
            "data.cache_dir",
            "differs between ranks: they built different tokenizers or datasets (a cache not shared between nodes?)",
            "point data.cache_dir (or $SEQPAR_CACHE) at storage every node shares, or pass data.tokenizer=<dir>",
        )


class Trainer:
    """This rank's part of a run. `resume`: the checkpoint to continue from, as the job's preflight found it
    (`seqpar.preflight.prepare(cfg).resume`); None starts fresh."""

    def __init__(self, cfg: Config, mesh: ParallelMesh, data=None, resume: ResumePoint | None = None):
        self.cfg, self.mesh, t = cfg, mesh, cfg.trainer
        self.device = mesh.device
        reset_peak_mem(self.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        if data is None:  # the first process to need raw text prepared prepares it; the others wait on a file lock
            data = build_data(cfg)
        self.data = data
        check_same_data(self.data, mesh)
        self.loss_context = lambda: loss_context(mesh.tp)  # vocab-parallel loss under tensor parallelism
        # torch's RNG, the same on every rank: attention dropout (tp ranks draw the same stream and keep their heads)
        torch.manual_seed(t.seed)
        # The loss from the output layer's input, a slab of tokens at a time, never the whole logits.
        self.output_loss = None
        if t.fused_loss:
            tp_group = mesh.group("tp") if mesh.tp > 1 else None
            layout = MODELS[cfg.model.arch].layout_for(cfg.model)
            token_shards = layout.output_takes_token_shards(cfg.parallel.tp_shard_activations)
            self.output_loss = lambda features, labels: output_loss_sum(self.model, features, labels, tp_group,
                                                                        token_shards)
        self.model, self.pipeline, self.reducer = build_rank_model(cfg, mesh, self.output_loss or loss_sum,
                                                                   loss_takes_features=self.output_loss is not None)
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t)  # on torch's AdamW: DeepSpeed steps that one too
        if getattr(self.data.train, "streaming", False):  # each dp rank reads its own part of the stream
            self.loader = self.data.train.loader(t.global_batch_size, mesh.dp_rank, mesh.dp, t.seed)
        else:
            self.loader = GlobalBatchLoader(self.data.train, t.global_batch_size, mesh.dp_rank, mesh.dp, seed=t.seed)
        self.micro_batch_size = t.micro_batch_size or t.global_batch_size // mesh.dp
        # BERT's head at the target tokens only; under tp and pp the head's layers are sharded or staged whole.
        self.targets_only = cfg.model.arch == "bert" and mesh.tp == 1 and mesh.pp == 1
        if t.engine == "deepspeed":
            accumulation = t.global_batch_size // mesh.dp // self.micro_batch_size
            self.engine = DeepSpeedEngine(self.model, self.optimizer, mesh, cfg, self.micro_batch_size, accumulation)
        else:
            self.engine = SeqparEngine(self.model, self.optimizer, mesh, self.reducer, self.pipeline, t.grad_clip)
        # A new context at each use: one torch.autocast object entered twice (nested) leaves autocast on after both
        # exit, since the inner entry overwrites the state the outer exit restores.
        bf16 = t.precision == "bf16"
        self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        self.state = TrainState()  # step, bad_steps (non-finite losses in a row), skipped_steps (in the whole run)
        self.checkpoints = CheckpointManager(cfg, self._checkpointed_states(), tokenizer=self.data.tokenizer,
                                             data_record=data_record(cfg, self.data),
                                             engine=self.engine if isinstance(self.engine, DeepSpeedEngine) else None)
        resumed = self.checkpoints.load(resume)  # passes over damaged checkpoints under resume=auto
        self.resumed_from = resumed.path if resumed is not None else None
        if self.resumed_from is not None and mesh.is_logging_rank:
            trim_metrics(Path(cfg.run_dir) / "metrics.jsonl", self.step)
        self.logger = build_loggers(cfg, mesh.is_logging_rank)
        self.records = StepRecords(cfg, mesh, self.data.train, self.loader)

    def _checkpointed_states(self) -> dict:
        deepspeed = isinstance(self.engine, DeepSpeedEngine)  # it saves the model and optimizer itself
        return training_states(None if deepspeed else self.model, self.optimizer, self.scheduler, self.loader,
                               self.state, self.mesh.rank, self.device)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def bad_steps(self) -> int:
        return self.state.bad_steps

    @property
    def skipped_steps(self) -> int:
        return self.state.skipped_steps

    def forward_loss(self, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed loss of a micro-batch (call inside `self.loss_context()`); under bf16 autocast the fused output
        layer's matmuls run in bf16 as the model's do (the loss's softmax is fp32 either way)."""
        with self.autocast():
            return model_loss_sum(self.engine.forward, micro, self.device, self.targets_only, self.output_loss)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over one global batch; returns (loss, grad_norm)."""
        self.model.train()
        batch = sequence_chunk(next(self.loader), self.mesh, self.cfg.model.causal)
        targets = self.mesh.sum_over_data((batch["labels"] != IGNORE_INDEX).sum().to(self.device, torch.float32))
        total = torch.zeros((), device=self.device)
        with self.loss_context():
            if self.pipeline is not None:  # the schedule runs forward and backward of all micro-batches
                with self.autocast():  # on summed losses: the gradients are divided by `targets` at the update
                    losses = self.pipeline.step(batch, MODEL_INPUTS)
                if holds_loss(self.pipeline, self.mesh):
                    total += sum(full_tensor(x.detach()) for x in losses)
            else:
                for micro in micro_batches(batch, self.micro_batch_size):
                    loss = self.forward_loss(micro)
                    self.engine.backward(loss / targets)
                    total += full_tensor(loss.detach())
        loss = ((self.mesh.sum_over_all(total) if self.pipeline else self.mesh.sum_over_data(total)) / targets).item()
        grad_scale = 1.0 / targets.item() if self.pipeline is not None else None
        grad_norm, applied = self.engine.step(math.isfinite(loss), grad_scale)  # reduce, clip, update (or skip)
        if applied and math.isfinite(loss):
            self.state.bad_steps = 0
        else:  # a skipped update: the weights and Adam's moments stay as they were
            self.state.bad_steps += 1
            self.state.skipped_steps += 1
        self.scheduler.step()
        self.state.step += 1
        if self.bad_steps >= self.cfg.trainer.max_bad_steps:
            raise TrainingAborted(
                f"trainer.max_bad_steps: the loss or gradient norm was not finite for {self.bad_steps} steps in a row "
                f"(steps {self.step - self.bad_steps + 1}-{self.step}); lower trainer.lr, raise trainer.warmup_steps, "
                "use trainer.precision=fp32 or check the data, then resume from the last checkpoint"
            )
        return loss, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        t = self.cfg.trainer
        for batch in eval_batches(self.data.val, t.global_batch_size, t.eval_batches, self.mesh.dp_rank, self.mesh.dp):
            batch = sequence_chunk(batch, self.mesh, self.cfg.model.causal)
            for micro in micro_batches(batch, self.micro_batch_size):
                with self.loss_context(), self.autocast():
                    if self.pipeline is None:
                        total += full_tensor(self.forward_loss(micro))
                    else:
                        labels = micro["labels"].to(self.device)
                        loss = self.pipeline.forward(micro, MODEL_INPUTS, lambda y, labels=labels: (self.output_loss or loss_sum)(y, labels))
                        if holds_loss(self.pipeline, self.mesh):
                            total += full_tensor(loss)
                count += (micro["labels"] != IGNORE_INDEX).sum()
        total = self.mesh.sum_over_all(total) if self.pipeline else self.mesh.sum_over_data(total)
        return (total / self.mesh.sum_over_data(count).clamp(min=1)).item()

    def single_device_model(self) -> nn.Module:
        """The trained weights as a plain single-device model (every rank must call it; complete on rank 0)."""
        if self.mesh.tp == 1 and self.mesh.pp == 1 and not self.engine.partitions_parameters:
            return self.model
        with self.engine.gathered():  # ZeRO-3's parameters in full for a moment
            return gather_model(self.model, self.cfg.model, self.mesh)

    def stop_requested(self, stop: StopSignal) -> int:
        """The signal any rank received (every rank must stop at the same step), or 0."""
        if self.mesh.world_size == 1:
            return stop.signum
        return int(self.mesh.max_over_all(float(stop.signum)))

    def save_checkpoint(self, reason: str, progress: Progress) -> None:
        """Save; every rank learns of a failure together. A periodic save that fails is a warning (the run goes on
        and tries again at the next one); the last save before exiting failing ends the run."""
        if hasattr(self.loader, "gather_positions"):  # a stream: every dp rank's position goes into meta.json
            self.loader.gather_positions(self.mesh.gather_over_all)
        try:
            path = self.checkpoints.save(self.step, reason)
        except SaveFailed as e:
            if reason != "periodic":
                raise TrainingAborted(f"{e}; free space or point checkpoint.dir at writable storage, then run the "
                                      "same command again: it resumes from the newest checkpoint") from None
            if self.mesh.is_logging_rank:
                print(f"warning: {e}; training goes on and tries again at the next checkpoint", file=sys.stderr,
                      flush=True)
            return
        if path is not None:
            progress.print(f"saved checkpoint {path}")

    def fit(self, stop: StopSignal | None = None) -> dict:
        """Train to `trainer.max_steps`, or until a preemption signal (`stop`: what the launcher recorded so far)
        makes every rank save a checkpoint and return at the end of the same step."""
        with (stop or StopSignal()).listening() as stop:
            return self._fit(stop)

    def _fit(self, stop: StopSignal) -> dict:
        t, c = self.cfg.trainer, self.cfg.checkpoint
        progress = Progress(t.max_steps, enabled=self.mesh.is_logging_rank, completed=self.step)
        if self.resumed_from is not None:
            progress.print(f"resumed from {self.resumed_from} at step {self.step}")
        losses: list[float] = []
        last: dict = {}
        tick, steps_since = time.perf_counter(), 0
        with progress:
            while self.step < t.max_steps:
                loss, grad_norm = self.train_step()
                losses.append(loss)
                steps_since += 1
                if self.step % t.log_every == 0 or self.step == 1 or self.step == t.max_steps:
                    last = self.records.record(self.step, losses, self.scheduler.get_last_lr()[0], grad_norm,
                                               time.perf_counter() - tick, steps_since, self.skipped_steps)
                    self.logger.log(last)
                    progress.log(last)
                    losses, steps_since, tick = [], 0, time.perf_counter()
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.max_steps:
                    rec = {"step": self.step, "eval_loss": self.evaluate()}
                    self.logger.log(rec)
                    progress.log(rec)
                    last.update(rec)
                    tick = time.perf_counter()  # evaluation time is not training throughput
                progress.advance(loss)
                if c.every and self.step % c.every == 0 and self.step < t.max_steps:
                    self.save_checkpoint("periodic", progress)
                signum = self.stop_requested(stop)
                if signum:
                    name = signal.Signals(signum).name
                    self.save_checkpoint(name, progress)
                    progress.print(f"stopped by {name} at step {self.step}; the run resumes from its newest "
                                   "checkpoint when started again with the same hydra.run.dir (checkpoint.resume=auto)")
                    self.logger.close()
                    return last
        if c.at_end:
            self.save_checkpoint("end", progress)
        if t.save_final and not_exportable(self.cfg.model):
            progress.print(f"final_model not written: {not_exportable(self.cfg.model)} (the checkpoints hold the weights)")
        elif t.save_final:
            model = self.single_device_model()  # collective under tensor parallelism: every rank takes part
            if self.mesh.is_logging_rank:
                out = save_pretrained(model, Path(self.cfg.run_dir) / "final_model", tokenizer=self.data.tokenizer)
                progress.print(f"saved final weights (transformers format) to {out}")
        self.logger.close()
        return last
