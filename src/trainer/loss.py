"""The training loss: summed cross-entropy over the target tokens (labels != -100).

With autograd recording and plain-tensor logits, the forward also computes the gradient with respect to the logits
(softmax minus the one-hot target, 0 at ignored tokens) and writes it into the logits' own memory, a slab of rows at
a time; backward only scales it by the incoming gradient. The logits are the largest tensor of a step (tokens x
vocabulary: 13 GB for 64K tokens of GPT-2's 50257 in fp32), and PyTorch's `cross_entropy` keeps two more of that
size (the log-softmax, then the gradient) besides the fp32 copy it makes of bf16 logits; here they are the only one,
plus an fp32 slab (`SLAB_ELEMENTS`) for bf16/fp16 logits. The logits' values are gone after the loss, so
this is for logits that nothing else reads: the trainer's. Without autograd (evaluation), and for tensor-parallel
(DTensor) logits, which torch's `loss_parallel` handles, it is `F.cross_entropy` itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from seqpar.data.mlm import IGNORE_INDEX
from seqpar.parallel.comm import gather_along

# Rows are processed in slabs of about this many logits: 16 MiB in fp32 on CPU, where a larger temporary is
# page-faulted in afresh each time; 256 MiB on a GPU, where a slab's dozen kernel launches should stay few.
SLAB_ELEMENTS = {"cpu": 2**22, "cuda": 2**26}


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `logits` (..., V) against `labels` (...) over labels != -100, in fp32."""
    logits, labels = logits.flatten(0, -2), labels.flatten()
    if torch.is_grad_enabled() and logits.requires_grad and type(logits) is torch.Tensor:
        return _CrossEntropySum.apply(logits, labels)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = logits.detach()
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        labels = labels.to(x.device)
        step = max(1, SLAB_ELEMENTS.get(x.device.type, SLAB_ELEMENTS["cuda"]) // max(1, x.shape[-1]))
        for start in range(0, x.shape[0], step):
            rows = slice(start, start + step)
            slab = x[rows].float()  # x's own rows when x is fp32; an fp32 copy of them otherwise
            target = labels[rows]
            valid = target != IGNORE_INDEX
            index = torch.where(valid, target, 0)[:, None]
            picked = slab.gather(1, index)[:, 0]
            peak = slab.amax(dim=-1, keepdim=True)
            probs = slab.sub_(peak).exp_()  # in place: the logits' memory now holds exp(x - max)
            norm = probs.sum(dim=-1, keepdim=True)
            total += torch.where(valid, peak[:, 0] + norm[:, 0].log() - picked, 0.0).sum()
            probs.div_(norm).scatter_add_(1, index, torch.full_like(picked, -1.0)[:, None])  # softmax - one-hot
            probs.masked_fill_(~valid[:, None], 0.0)
            if probs.data_ptr() != x[rows].data_ptr():
                x[rows] = probs
        ctx.grad = x  # not saved for backward: it is the gradient, not an input to recompute from
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("the loss's backward ran twice: its gradient is computed once, in forward")
        return grad.mul_(grad_total), None  # a 0-dim fp32 factor: bf16 gradients are rounded once, not twice


# The fused output-layer loss's slabs: about this many logits at a time (16 MiB in fp32 on CPU, as SLAB_ELEMENTS;
# 256 MiB on a GPU), and never fewer than LINEAR_SLAB_MIN_ROWS tokens. Each slab adds its product to the weight's
# fp32 gradient (vocabulary x hidden elements read and written, and under bf16 converted) for 6 x rows multiply-adds
# per element, so a slab of few rows (83 of GPT-2's 50257 in 16 MiB) spends more time on that than on its matmuls:
# `scripts/bench/fused_loss_slabs.py` measures it.
LINEAR_SLAB_ELEMENTS = {"cpu": 2**22, "cuda": 2**26}
LINEAR_SLAB_MIN_ROWS = 256


def linear_slab_rows(vocab: int, device_type: str) -> int:
    """Tokens per slab of the fused output-layer loss for a vocabulary (this rank's rows of it) of `vocab`."""
    elements = LINEAR_SLAB_ELEMENTS.get(device_type, LINEAR_SLAB_ELEMENTS["cuda"])
    return max(LINEAR_SLAB_MIN_ROWS, elements // max(1, vocab))


def linear_loss_sum(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    group=None, vocab_start: int = 0, partial_features_grad: bool = False) -> torch.Tensor:
    """Summed cross-entropy of the logits `features @ weight.T + bias` against `labels`, without ever holding them:
    the output layer and the loss run a slab of tokens at a time, and with autograd recording the gradients with
    respect to the features, the weight and the bias are computed in the same pass (Liger's fused linear
    cross-entropy), so the peak at the loss is one slab's logits.

    Tokens whose label is -100 are left out before anything is computed (they add nothing). Under
    vocabulary-parallel tensor parallelism `weight` and `bias` are this rank's rows of the vocabulary, starting at
    `vocab_start`, and `group` the tp group: the softmax's maximum and sum and the target's logit are reduced over
    it, and the features' gradient is summed over it, unless `partial_features_grad` leaves that sum to what made
    the features (an all-gather of token shards, whose backward sums and scatters). Under autocast the matmuls run in
    its dtype, as the output layer's would."""
    features, labels = features.flatten(0, -2), labels.flatten().to(features.device)
    keep = (labels != IGNORE_INDEX).nonzero()[:, 0]
    if torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad):
        return _LinearCrossEntropySum.apply(features, weight, bias, labels, keep, group, vocab_start,
                                            partial_features_grad)
    return _linear_cross_entropy(features, weight, bias, labels, keep, group, vocab_start, False, False)[0]


def _compute_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def _linear_cross_entropy(features, weight, bias, labels, keep, group, vocab_start: int, with_grads: bool,
                          partial_features_grad: bool):
    """(summed loss, d loss / d features, d loss / d weight, d loss / d bias) for the kept rows; gradients None
    without `with_grads`."""
    device, dtype = features.device, _compute_dtype(features.device, weight)
    with torch.autocast(device.type, enabled=False):
        w = weight.detach().to(dtype)
        b = bias.detach().to(dtype) if bias is not None else None
        every = len(keep) == features.shape[0]  # no ignored token: the features themselves, not a copy of rows
        x = (features.detach() if every else features.detach()[keep]).to(dtype)
        target = labels[keep] - vocab_start
        vocab = w.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=device)
        # The features' gradient in their own shape and dtype, written a slab of rows at a time (zero at ignored
        # tokens) and scaled in place in backward: one buffer of the features' size.
        grad_x = None
        if with_grads:
            grad_x = (torch.empty_like if every else torch.zeros_like)(features, memory_format=torch.contiguous_format)
        # The slabs reuse their buffers (a fresh temporary of this size is page-faulted in anew on CPU each time):
        # the fp32 logits, turned into their gradient in place; with a lower compute dtype, the matmuls' outputs in
        # it (a slab's logits, then their gradient) and a slab's share of the weight's gradient, added to the fp32
        # gradient (one vocabulary x hidden buffer, accumulated in place) as it is made.
        step = min(linear_slab_rows(vocab, device.type), max(1, x.shape[0]))
        slab = torch.empty(step, vocab, dtype=torch.float32, device=device)
        low = torch.empty(step, vocab, dtype=dtype, device=device) if dtype != torch.float32 else None
        grad_w = grad_w_part = grad_b = None
        if with_grads:
            # Written whole by the first slab (no zero fill first), then accumulated into.
            grad_w = (torch.empty if len(x) else torch.zeros)(weight.shape, dtype=torch.float32, device=device)
            grad_w_part = torch.empty(weight.shape, dtype=dtype, device=device) if low is not None else None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if bias is not None else None
        for start in range(0, x.shape[0], step):
            rows = slice(start, start + step)
            n = len(x[rows])
            # The output layer's logits of a slab (rounded to its dtype, as the layer's own would be), in fp32.
            out = slab[:n] if low is None else low[:n]
            if b is None:
                torch.mm(x[rows], w.t(), out=out)
            else:
                torch.addmm(b, x[rows], w.t(), out=out)
            logits = out if low is None else slab[:n].copy_(out)
            mine = (target[rows] >= 0) & (target[rows] < vocab)  # the target is in this rank's vocabulary rows
            index = torch.where(mine, target[rows], 0)[:, None]
            picked = torch.where(mine, logits.gather(1, index)[:, 0], 0.0)
            peak = logits.amax(dim=-1)
            if group is not None:
                dist.all_reduce(peak, dist.ReduceOp.MAX, group=group)
            probs = logits.sub_(peak[:, None]).exp_()
            sums = torch.stack([probs.sum(dim=-1), picked])
            if group is not None:
                dist.all_reduce(sums, group=group)
            norm, picked = sums
            total += (peak + norm.log() - picked).sum()
            if not with_grads:
                continue
            grad = probs.div_(norm[:, None])
            grad.scatter_add_(1, index, torch.where(mine, -1.0, 0.0)[:, None])  # softmax minus the one-hot target
            if grad_b is not None:
                grad_b += grad.sum(dim=0)
            if low is not None:
                grad = low[:n].copy_(grad)
            grad_x[rows if every else keep[rows]] = (grad @ w).to(grad_x.dtype)
            if grad_w_part is None and start == 0:
                torch.mm(grad.t(), x[rows], out=grad_w)
            elif grad_w_part is None:
                grad_w.addmm_(grad.t(), x[rows])
            elif start == 0:
                grad_w.copy_(torch.mm(grad.t(), x[rows], out=grad_w_part))
            else:
                _add_into(grad_w, torch.mm(grad.t(), x[rows], out=grad_w_part))
        if with_grads and group is not None and not partial_features_grad:
            dist.all_reduce(grad_x, group=group)  # each rank's vocabulary rows add to every feature's gradient
    return total, grad_x, grad_w, grad_b


def _add_into(total: torch.Tensor, part: torch.Tensor) -> None:
    """`total += part` for an fp32 `total` and a lower-precision `part`. On CPU, add_ converts the whole of `part` to
    fp32 first, a fresh temporary that is page-faulted in anew each time; in rows of SLAB_ELEMENTS it is a small
    one that the allocator reuses."""
    if total.device.type != "cpu":
        total.add_(part)
        return
    rows = max(1, SLAB_ELEMENTS["cpu"] // max(1, total[0].numel()))
    for start in range(0, total.shape[0], rows):
        total[start : start + rows].add_(part[start : start + rows])


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight, bias, labels, keep, group, vocab_start, partial_features_grad):
        total, grad_x, grad_w, grad_b = _linear_cross_entropy(features, weight, bias, labels, keep, group,
                                                              vocab_start, True, partial_features_grad)
        ctx.grads = (grad_x, grad_w, grad_b)  # the gradients themselves, scaled in backward
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("the loss's backward ran twice: its gradients are computed once, in forward")
        (grad_x, grad_w, grad_b), ctx.grads = ctx.grads, None
        weight_dtype = ctx.weight_dtype
        grad_features = grad_x.mul_(grad_total)  # a 0-dim fp32 factor: bf16 gradients are rounded once
        grad_bias = grad_b.mul_(grad_total).to(weight_dtype) if grad_b is not None else None
        return grad_features, grad_w.mul_(grad_total).to(weight_dtype), grad_bias, None, None, None, None, None


def output_loss_sum(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, tp_group=None,
                    token_shards: bool = False) -> torch.Tensor:
    """`linear_loss_sum` with `model`'s output layer: under tensor parallelism its DTensor weight's vocabulary rows on
    this rank (`tp_group`), and with `token_shards` (activation sharding) the features' token shards gathered first;
    under DeepSpeed ZeRO-3 inside a call of the layer (`_loss_as_module_call`), which gathers its weight."""
    layer = model.output_layer
    weight, bias = layer.weight, layer.bias
    if hasattr(weight, "ds_id"):  # partitioned by DeepSpeed ZeRO-3
        return _loss_as_module_call(layer, features, labels)
    if not isinstance(weight, DTensor):
        return linear_loss_sum(features, weight, bias, labels)
    if token_shards:  # (B, T/tp, C) -> (B, T, C); the gather's backward hands each rank its tokens' gradient
        features = gather_along(features, tp_group, dim=1)
    local = weight.to_local()
    return linear_loss_sum(features, local, bias.to_local() if bias is not None else None, labels, tp_group,
                           vocab_start=dist.get_rank(tp_group) * local.shape[0], partial_features_grad=token_shards)


def _loss_as_module_call(layer: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`linear_loss_sum` run as a call of the output layer itself, for DeepSpeed ZeRO-3, which holds each rank's
    partition of a weight and gathers the whole weight only around a call of a module that owns it: its hooks on
    the layer gather the weight before this forward and release it after, and, because the loss is the call's
    output, gather it again when backward reaches the loss and release it once the features' gradient is out. The
    weight's gradient, computed whole in the forward, is handed to autograd in that backward, where ZeRO-3's
    gradient hook reduces it and keeps this rank's partition. The layer's own forward is swapped for this one call
    (an instance attribute shadows the class's method) and restored after it."""
    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return linear_loss_sum(x, layer.weight, layer.bias, y)

    layer.forward = forward
    try:
        return layer(features, labels)
    finally:
        del layer.forward
