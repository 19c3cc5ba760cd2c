"""Other projects' sequence-parallel attention, as core-attention functions beside ours in the benchmarks.

Each peer is optional: `missing(name)` says why it cannot run here and how to install it, and the benchmarks skip it
with that message. Each is built inside a rank (its process group already up) by `attention(name, group)` and
takes this rank's (B, H, T/sp, D) chunk like `seqpar.parallel.sequence`'s functions.

- `ds-ulysses`: DeepSpeed-Ulysses' `DistributedAttention` (all-to-all from sequence chunks to head groups, SDPA on
  each rank's heads, all-to-all back). `pip install -e ".[deepspeed]"`.
- `colossalai-rsa`: the paper's own Ring Self-Attention, ColossalAI 0.5.0's legacy `RingQK` / `RingAV` composed as
  its `TransformerSelfAttentionRing` composes them (scores divided in place, `FusedScaleMaskSoftmax`, which on CPU
  in fp32 is torch's softmax). ColossalAI 0.5.0 pins a torch of its own, so it goes in without its dependencies,
  with the few packages it imports at module level (`COLOSSALAI_INSTALL`). On CPU its `CpuAccelerator.synchronize`,
  which its ring exchange calls after every step, raises; here it is made a no-op (the exchange has already been
  waited for). Its gradients for q, k and v are 1/sp of the true ones: it leaves the rest to a separate gradient
  handler. The time and memory of the step are what we compare.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import warnings

import torch.nn.functional as F

COLOSSALAI_INSTALL = ("pip install --no-deps colossalai==0.5.0 peft==0.21.2 accelerate==1.15.0 galore-torch==1.0 "
                      "bitsandbytes==0.50.2 kernels==0.17.2")
PEERS = {  # name: (modules it imports, how to install them)
    "ds-ulysses": (("deepspeed",), 'pip install -e ".[deepspeed]"'),
    "colossalai-rsa": (("colossalai", "peft", "accelerate", "galore_torch", "bitsandbytes", "kernels"),
                       COLOSSALAI_INSTALL),
}
BIDIRECTIONAL_ONLY = {"colossalai-rsa"}  # its layout is contiguous chunks: no zigzag causal


def missing(name: str, causal: bool = False) -> str | None:
    """Why peer `name` cannot run here (with the install line), or None if it can."""
    modules, install = PEERS[name]
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        return f"{name} needs {', '.join(absent)}, not installed ({install})"
    if causal and name in BIDIRECTIONAL_ONLY:
        return f"{name} is measured bidirectional only (contiguous chunks, no zigzag causal layout)"
    return None


def attention(name: str, group):
    """Peer `name` as a core-attention function over `group` (call inside a rank)."""
    return {"ds-ulysses": _ds_ulysses, "colossalai-rsa": _colossalai_rsa}[name](group)


def _ds_ulysses(group):
    """DeepSpeed-Ulysses: all-to-all from sequence chunks to head groups, SDPA, all-to-all back. Its layout is
    (batch, sequence, heads, head_dim)."""
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    from seqpar.trainer.engine import import_deepspeed

    import_deepspeed()  # quiet start-up
    deepspeed.init_distributed(dist_backend="gloo")  # its comm layer joins the process group already running

    def local(q, k, v, causal):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)

    attn = DistributedAttention(local, group, scatter_idx=2, gather_idx=1)

    def fn(q, k, v, *, causal, **_):
        out = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, causal)
        return out.transpose(1, 2)

    return fn


def _colossalai_rsa(group):
    """ColossalAI's legacy Ring Self-Attention over `group`, registered as its sequence-parallel mode."""
    import torch.distributed as dist

    # Its module-level imports reach bitsandbytes, which looks for a CPU kernel on the Hugging Face Hub: offline,
    # and quiet about not finding it (nothing here quantizes).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():  # deprecation warnings of its imports, by the hundred
        warnings.simplefilter("ignore")
        from colossalai.accelerator.cpu_accelerator import CpuAccelerator
        from colossalai.legacy.context.parallel_mode import ParallelMode
        from colossalai.legacy.core import global_context as gpc
        from colossalai.legacy.nn.layer.parallel_sequence import RingAV, RingQK
        from colossalai.nn.layer.scaled_softmax import AttnMaskType, FusedScaleMaskSoftmax

    CpuAccelerator.synchronize = lambda self, device=None: None
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group)
    for mode in (ParallelMode.GLOBAL, ParallelMode.SEQUENCE):
        gpc._register_dist(rank, world, group, None, ranks, mode)
    gpc.add_global_rank(ParallelMode.GLOBAL, dist.get_rank())
    # fp32, the layer's defaults (fusion asked for, no scale of its own): torch's softmax on CPU
    softmax = FusedScaleMaskSoftmax(False, False, AttnMaskType.padding, True, None, False, None)

    def fn(q, k, v, *, causal, key_padding_mask, dropout_p, document_ids=None):
        if causal or key_padding_mask is not None or dropout_p or document_ids is not None:
            raise ValueError("colossalai-rsa is measured bidirectional, without padding or dropout")
        b, h, c, d = q.shape
        q3, k3, v3 = (x.contiguous().view(b * h, c, d) for x in (q, k, v))  # the layer's contiguous copies
        scores = RingQK.apply(q3, k3, b, h, c)  # (B * H, c, L)
        scores /= math.sqrt(d)
        probs = softmax(scores.view(b, h, c, -1), None)
        out = RingAV.apply(probs.view(b * h, c, -1), v3, b, h, d, c)
        return out.view(b, h, c, d)

    return fn
