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
import torch.nn.functional as F

from seqpar.data.mlm import IGNORE_INDEX

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
