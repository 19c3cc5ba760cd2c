"""Data parallelism over the `dp_sp` ranks: DistributedDataParallel with a summing gradient all-reduce.

Every rank of dp x sp holds a full replica of the parameters and computes gradients from different tokens
(different sequences across dp, different chunks of the same sequences across sp). The trainer divides each
rank's summed loss by the number of target tokens in the whole global batch, so the full gradient is the *sum*
of the ranks' gradients; the comm hook below all-reduces with SUM instead of DDP's default mean.

Why DDP and not FSDP2: in the long-sequence regime seqpar targets, memory goes to activations (which sequence
parallelism divides), not to parameters; DDP keeps one all-reduce per gradient bucket, overlapped with backward,
while FSDP2 would add an all-gather per layer for every micro-batch in forward and again in backward.
"""


import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _sum_allreduce_hook(group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Forward: nothing. Backward, per bucket of gradients: all_reduce(SUM) over `group`, asynchronously."""
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def replicate(model: nn.Module, group: dist.ProcessGroup, device: torch.device) -> nn.Module:
    """Wrap `model` so that backward sums its gradients over `group`."""
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None,
        process_group=group,
        broadcast_buffers=False,  # no buffers that change in training
        init_sync=True,  # start every replica from rank 0's weights (they are equal anyway: same seed)
    )
    ddp.register_comm_hook(group, _sum_allreduce_hook)
    return ddp
