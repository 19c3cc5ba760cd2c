"""DeepSpeed ZeRO inside the trainer's pieces, on gloo processes: the fused output-layer loss under ZeRO-3 (whose
weights are partitioned and gathered only around their module's call), and AdamW's state offloaded to host memory.

Each rank trains a tiny model for a few steps on its share of a fixed global batch with `DeepSpeedEngine`, the way
`Trainer.train_step` does (losses divided by the global target count), and compares its losses and final whole
weights with one plain process that trains the whole batch with the logits' loss and torch's AdamW.
"""

from __future__ import annotations

import pytest
import torch

from seqpar.config import Config, ModelConfig, ParallelConfig, TrainerConfig
from seqpar.data.mlm import IGNORE_INDEX
from seqpar.models import build_model
from seqpar.parallel.mesh import ParallelMesh
from seqpar.parallel.parallelize import materialize
from seqpar.parallel.sequence import shard_batch
from seqpar.trainer.engine import DeepSpeedEngine
from seqpar.trainer.loss import loss_sum, output_loss_sum
from seqpar.trainer.optim import build_optimizer
from seqpar.trainer.step import model_loss_sum
from seqpar.trainer.weights import build_rank_model, initial_values

from .spawn import spawn

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install -e '.[deepspeed]'")

STEPS, BATCH, SEQ = 3, 4, 24
# fp32 on CPU; ZeRO-3 reduces the gradients in a different order than one process sums them, and Adam's update
# (a quotient of moments) magnifies that rounding in near-zero gradients. Measured after 3 steps at lr 1e-3: losses
# within 1.1e-7 relative, weights within 1e-5 (Llama, fused against the logits under ZeRO-3; 5e-6 against one
# process).
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 5e-5
# DeepSpeed's CPU Adam against torch's AdamW, the same update in another order of float operations: measured equal
# losses and weights within 2e-8.
OFFLOAD_LOSS_RTOL, OFFLOAD_WEIGHT_ATOL = 1e-6, 1e-6


def _config(arch: str, parallel: ParallelConfig, **trainer) -> Config:
    cfg = Config()
    model = {"arch": arch, "num_layers": 2, "hidden_size": 32, "num_heads": 4, "vocab_size": 96, "max_seq_len": SEQ}
    if arch == "llama":
        model["num_kv_heads"] = 2  # grouped-query attention; the head is untied from the embedding
    cfg.model = ModelConfig(**model)
    cfg.parallel = parallel
    cfg.trainer = TrainerConfig(global_batch_size=BATCH, lr=1e-3, warmup_steps=0, engine="deepspeed", **trainer)
    return cfg


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, 96, (BATCH, SEQ + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[0, :5] = IGNORE_INDEX  # some tokens without a target
        out.append({"input_ids": ids[:, :-1], "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).clone(),
                    "labels": labels})
    return out


def _reference(cfg: Config) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, the whole batch, the logits' loss, torch AdamW (no clipping reached at these sizes)."""
    model = build_model(cfg.model, "meta")
    materialize(model, torch.device("cpu"), initial_values(cfg, model))
    opt = build_optimizer(model, cfg.trainer)
    losses = []
    for batch in _batches():
        targets = (batch["labels"] != IGNORE_INDEX).sum()
        loss = loss_sum(model(batch["input_ids"], batch["position_ids"]), batch["labels"]) / targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _zero_run(cfg: Config, fused: bool, save_after: int | None = None, resume: str | None = None,
              folder: str | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """This rank's share of every batch through DeepSpeedEngine (as Trainer.train_step): the summed losses over the
    ranks and the whole weights at the end. `save_after`: save a checkpoint in `folder` after that many steps;
    `resume`: load the checkpoint in `folder` saved after that many steps and train the steps after it."""
    mesh = ParallelMesh.from_config(cfg.parallel, torch.device("cpu"))
    holder = {}
    output_loss = (lambda features, labels: output_loss_sum(holder["model"], features, labels)) if fused else None
    model, _, _ = build_rank_model(cfg, mesh, output_loss or loss_sum, loss_takes_features=fused)
    holder["model"] = model
    engine = DeepSpeedEngine(model, build_optimizer(model, cfg.trainer), mesh, cfg, BATCH // mesh.dp, 1)
    start = 0
    if resume is not None:
        engine.load(folder)
        start = resume
    losses = []
    for step, batch in enumerate(_batches()[start:], start):
        share = {k: v.chunk(mesh.dp)[mesh.dp_rank] for k, v in batch.items()}
        if mesh.sp > 1:
            share = shard_batch(share, mesh.sp, mesh.local_rank("sp"), cfg.model.causal)
        targets = mesh.sum_over_data((share["labels"] != IGNORE_INDEX).sum().float())
        loss = model_loss_sum(engine.forward, share, mesh.device, False, output_loss)
        engine.backward(loss / targets)
        engine.step(True)
        losses.append((mesh.sum_over_data(loss.detach()) / targets).item())
        if save_after == step + 1:
            engine.save(folder)
    with engine.gathered():
        weights = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    return losses, weights


def _assert_close(got, want, loss_rtol: float, weight_atol: float, label: str) -> None:
    (losses, weights), (ref_losses, ref_weights) = got, want
    for a, b in zip(losses, ref_losses, strict=True):
        assert abs(a - b) / b < loss_rtol, (label, losses, ref_losses)
    for name, w in ref_weights.items():
        diff = (weights[name] - w).abs().max().item()
        assert diff < weight_atol, (label, name, diff)


def _fused_loss_under_zero3(rank, world, arch, sp):
    cfg = _config(arch, ParallelConfig(dp=world // sp, sp=sp), zero_stage=3)
    want = _reference(cfg)
    fused, logits = _zero_run(cfg, fused=True), _zero_run(cfg, fused=False)
    _assert_close(fused, want, LOSS_RTOL, WEIGHT_ATOL, f"{arch} zero-3 fused loss")
    _assert_close(fused, logits, LOSS_RTOL, WEIGHT_ATOL, f"{arch} zero-3 fused loss against its logits")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch,sp", [("gpt", 1), ("llama", 1), ("llama", 2)])
def test_fused_loss_under_zero3_matches_the_logits_and_one_process(arch, sp):
    """The fused loss inside a call of the ZeRO-3-partitioned output layer: on dp=2 (and dp=2 x sp=2 with ring
    attention), GPT's head tied to the embedding and Llama's untied head give one process's losses and weights."""
    spawn(_fused_loss_under_zero3, 2 * sp, arch, sp, timeout=280)


def _offloaded_optimizer(rank, world, stage, folder):
    def config(**trainer):
        return _config("llama", ParallelConfig(dp=2), zero_stage=stage, **trainer)

    plain = _zero_run(config(), fused=True)
    offloaded = _zero_run(config(offload_optimizer=True), fused=True, save_after=1, folder=folder)
    _assert_close(offloaded, plain, OFFLOAD_LOSS_RTOL, OFFLOAD_WEIGHT_ATOL, f"zero-{stage} offloaded optimizer")
    # Resumed from its checkpoint after step 1 (weights and the host-resident Adam state): the same steps 2-3.
    losses, weights = _zero_run(config(offload_optimizer=True), fused=True, resume=1, folder=folder)
    assert losses == offloaded[0][1:], (losses, offloaded[0])
    for name, w in offloaded[1].items():
        assert torch.equal(weights[name], w), name


@pytest.mark.timeout(400)
def test_offloaded_optimizer_matches_zero_on_the_device_and_resumes_exactly(tmp_path):
    """trainer.offload_optimizer: AdamW's state and update in host memory (DeepSpeed's CPU Adam) give ZeRO's
    losses and weights without it, and a run resumed from its checkpoint continues exactly. ZeRO-3, the stage the
    longest-sequence plans use (ZeRO-2 offloads through the same optimizer; one stage keeps the suite short, as
    the first use compiles DeepSpeed's CPU Adam)."""
    spawn(_offloaded_optimizer, 2, 3, str(tmp_path), timeout=380)
