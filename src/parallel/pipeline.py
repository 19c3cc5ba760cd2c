"""Pipeline parallelism with `torch.distributed.pipelining`: the model cut into stages, run by a schedule.

`parallel.pp` ranks each hold `v` stages (v = 2 virtual stages for `interleaved_1f1b`, else 1); stage s of
S = pp * v lives on pp rank s % pp and holds an even share of the transformer layers (the first stages take one
more when they do not divide). The first stage also holds the embeddings, the last the output head and the loss.
The model object on each rank is pruned in place: layers of other ranks become `nn.Identity` (so parameter names
stay global) and embeddings / head are dropped where unused, so each rank allocates only its part.

The tied weights (GPT's embedding and head, BERT's embedding and MLM decoder; none in an untied Llama) live on the
first and the last stage as two copies with equal initial values; `sync_tied_grads` sums their gradients over the pp group after backward,
so the copies stay equal. Per micro-batch the schedule passes hidden states between stages (send/recv) and the
position ids, padding mask, token types, dropout seeds and document ids as keyword arguments to every stage; the loss of a micro-batch is its
summed cross-entropy divided by the global target count, so gradients are not rescaled (`scale_grads=False`).

Communication: per micro-batch and stage boundary one send/recv of the (B, T/sp, C) activations forward and one of
their gradient backward; one all-reduce of the tied weight's gradient per step.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.distributed as dist
from torch import nn

from seqpar.config import virtual_stages
from seqpar.models.dropout import DropoutKey
from seqpar.parallel.data_parallel import local_tensor


def layer_split(num_layers: int, stages: int) -> list[range]:
    """Layers of each stage: an even split, the first stages one more when it does not divide."""
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class Stage(nn.Module):
    """One pipeline stage: a shallow view of the model holding only its layers (and embeddings / head)."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool, head_features_only: bool = False):
        super().__init__()
        self.first, self.last, self.head_features_only = first, last, head_features_only
        shell = copy.copy(model)  # shares parameters; own module table below
        shell._modules = {k: m for k, m in model._modules.items() if k != "layers"}
        shell.layers = nn.ModuleList(model.layers[i] for i in layers)
        for name in model.layout.embedding if not first else ():
            setattr(shell, name, None)
        for name in model.layout.head if not last else ():
            setattr(shell, name, None)
        self.model = shell

    def forward(self, x, position_ids, attention_mask=None, token_type_ids=None, dropout_seed=None, document_ids=None):
        key = DropoutKey(dropout_seed, position_ids) if dropout_seed is not None else None
        if self.first:
            x = self.model.embed(x, position_ids, token_type_ids, key)
        mask = attention_mask.bool() if attention_mask is not None else None
        for block in self.model.layers:
            x = block(x, mask, key, position_ids, document_ids)
        if not self.last:
            return x
        return self.model.head_features(x) if self.head_features_only else self.model.head(x)


class Pipeline:
    """This rank's stages of `model` and the schedule that runs them over the pp group."""

    def __init__(self, model: nn.Module, pp_rank: int, pp: int, group, schedule: str, microbatches: int,
                 device: torch.device, loss_fn, loss_takes_features: bool = False):
        from torch.distributed.pipelining import PipelineStage

        v = virtual_stages(schedule)
        n_stages = pp * v
        split = layer_split(len(model.layers), n_stages)
        self.stage_ids = [pp_rank + k * pp for k in range(v)]
        self.first = 0 in self.stage_ids
        self.last = n_stages - 1 in self.stage_ids
        self.n_stages, self.pp, self.group = n_stages, pp, group
        self.modules = [Stage(model, split[s], s == 0, s == n_stages - 1, loss_takes_features)
                        for s in self.stage_ids]
        # Prune the model to this rank's part (names stay global: other ranks' layers become Identity).
        mine = {i for s in self.stage_ids for i in split[s]}
        for i in range(len(model.layers)):
            if i not in mine:
                model.layers[i] = nn.Identity()
        # The tied embedding/head pair, if the model ties one (an untied model has nothing to keep in sync).
        head_name, embedding_name = next(iter(model.layout.tied.items()), (None, None))
        tied_head = model.get_parameter(head_name) if head_name else None
        for name in model.layout.embedding if not self.first else ():
            setattr(model, name, None)
        for name in model.layout.head if not self.last else ():
            setattr(model, name, None)
        self.tied = None  # this rank's copy of the tied embedding/head weight, if it holds one
        if tied_head is not None and self.first:
            self.tied = model.get_parameter(embedding_name)
        elif self.last:
            self.tied = tied_head
        self.tied_shape = tied_head.to_local().shape if hasattr(tied_head, "to_local") else getattr(tied_head, "shape", None)
        self.tied_dtype = getattr(tied_head, "dtype", None)
        self.device = device
        stages = [
            PipelineStage(m, s, n_stages, device, group=group) for m, s in zip(self.modules, self.stage_ids, strict=True)
        ]
        self.schedule = _schedule(schedule, stages, microbatches, loss_fn)
        # The last stage would otherwise keep every micro-batch's output (the logits) to return them; only the losses
        # are used (torch >= 2.10 can skip that).
        no_outputs = "return_outputs" in inspect.signature(self.schedule.step).parameters
        self._no_outputs = {"return_outputs": False} if no_outputs else {}

    def step(self, batch: dict[str, torch.Tensor], inputs: tuple[str, ...]) -> list[torch.Tensor]:
        """Forward and backward of one batch (split into micro-batches); the last stage returns their losses."""
        kwargs = {k: batch[k].to(self.device) for k in inputs if k != "input_ids" and k in batch}
        args = (batch["input_ids"].to(self.device),) if self.first else ()
        losses: list[torch.Tensor] = []
        target = batch["labels"].to(self.device) if self.last else None
        self.schedule.step(*args, target=target, losses=losses if self.last else None, **self._no_outputs, **kwargs)
        return losses

    def counted(self, p: nn.Parameter) -> bool:
        """Whether `p` counts in the global gradient norm (the last stage's tied copy does not)."""
        return not (self.last and not self.first and p is self.tied)

    def sync_tied_grads(self) -> None:
        """Sum the tied weight's gradient over its first- and last-stage copies (middle stages add zeros)."""
        if self.pp == 1 or self.tied_shape is None:  # no pipeline, or no tied weights
            return

        if self.tied is not None and self.tied.grad is not None:
            g = local_tensor(self.tied.grad)
        else:
            g = torch.zeros(self.tied_shape, dtype=self.tied_dtype, device=self.device)
        dist.all_reduce(g, group=self.group)

    @torch.no_grad()
    def forward(self, micro: dict[str, torch.Tensor], inputs: tuple[str, ...], last_fn):
        """Forward only (evaluation), stage by stage with send/recv; `last_fn(output)` on the last stage."""
        kwargs = {k: micro[k].to(self.device) for k in inputs if k != "input_ids" and k in micro}
        x = micro["input_ids"].to(self.device)
        result = None
        for s, module in zip(self.stage_ids, self.modules, strict=True):
            if s > 0:  # hidden states travel in fp32 whatever autocast produced
                x = torch.empty(self._hidden_shape(micro), dtype=torch.float32, device=self.device)
                dist.recv(x, group=self.group, group_src=(s - 1) % self.pp)
            y = module(x, **kwargs)
            if s < self.n_stages - 1:
                dist.send(y.float().contiguous(), group=self.group, group_dst=(s + 1) % self.pp)
            else:
                result = last_fn(y)
        return result

    def _hidden_shape(self, micro):
        b, t = micro["input_ids"].shape
        return (b, t, self.modules[0].model.config.hidden_size)


def _schedule(name: str, stages, microbatches: int, loss_fn):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    if name == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
    return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
