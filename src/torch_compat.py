"""The private torch APIs seqpar relies on, each in one place, and the start-up check that this torch has them.

torch promises nothing about names that start with an underscore, so each use has one home: the wrappers below
(the mesh's flattened dp x sp axis, the tp axis viewed as key/value heads x their replicas, the default store,
activation checkpointing's wrapper) and, for ring attention's fused kernels, `seqpar.parallel.sequence.kernels`,
which calls the aten ops listed in `ATTENTION_OPS` positionally. `check_torch()` runs at the entry point
(`seqpar.trainer.prepare`), before any process starts: a torch that lacks one of them, or whose kernel takes other
arguments, is one `error: torch ...` line instead of a failure deep inside a rank. pyproject.toml's range
(`REQUIREMENT`) is what was tested (2.13) plus the next minor release, which this check vets at start-up.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from seqpar.errors import UserError

TESTED = "2.13"
REQUIREMENT = "torch>=2.13,<2.15"  # keep equal to pyproject.toml's

# The aten kernels of kernels.py: the leading arguments it passes by position, and how many results it unpacks.
ATTENTION_OPS = {
    "_scaled_dot_product_flash_attention_for_cpu": (("query", "key", "value", "dropout_p", "is_causal", "attn_mask"), 2),
    "_scaled_dot_product_flash_attention_for_cpu_backward": (
        ("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal", "attn_mask"), 3),
    "_scaled_dot_product_flash_attention": (("query", "key", "value", "dropout_p", "is_causal"), 2),
    "_scaled_dot_product_flash_attention_backward": (
        ("grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
         "dropout_p", "is_causal", "philox_seed", "philox_offset"), 3),
    "_scaled_dot_product_efficient_attention": (
        ("query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal"), 2),
    "_scaled_dot_product_efficient_attention_backward": (
        ("grad_out_", "query", "key", "value", "attn_bias", "out", "logsumexp", "philox_seed", "philox_offset",
         "dropout_p", "grad_input_mask", "is_causal"), 4),
}

# Private module attributes: the wrappers below, and the names DCP pickles into a checkpoint's .metadata index,
# which seqpar's safe unpickler allows by name (seqpar.trainer.checkpoint).
ATTRIBUTES = (
    ("torch.distributed.device_mesh", "DeviceMesh._flatten"),
    ("torch.distributed.device_mesh", "DeviceMesh._unflatten"),
    ("torch.distributed.distributed_c10d", "_get_default_store"),
    ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "checkpoint_wrapper"),
    ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "_CHECKPOINT_WRAPPED_MODULE"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch._dynamo", ""),  # imported once before local ranks are forked (seqpar.parallel.launch)
)

CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module"  # the attribute checkpoint_wrapper keeps the wrapped block under


def _lookup(module: str, name: str):
    """The attribute `name` of `module`; with no name, only that the module is there (it is not imported)."""
    if not name:
        if importlib.util.find_spec(module) is None:
            raise ImportError(module)
        return None
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def missing_apis() -> list[str]:
    """The private APIs this torch lacks or has changed (empty when all are as seqpar calls them)."""
    gaps = []
    for module, name in ATTRIBUTES:
        try:
            _lookup(module, name)
        except (ImportError, AttributeError):
            gaps.append(f"{module}.{name}".rstrip("."))
    try:
        if _lookup("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "_CHECKPOINT_WRAPPED_MODULE") \
                != CHECKPOINT_WRAPPED:
            gaps.append("checkpoint_wrapper's module name")
    except (ImportError, AttributeError):
        pass
    for name, (leading, results) in ATTENTION_OPS.items():
        op = getattr(torch.ops.aten, name, None)
        schema = getattr(getattr(op, "default", None), "_schema", None)
        if schema is None:
            gaps.append(f"aten.{name}")
            continue
        arguments = tuple(a.name for a in schema.arguments)
        if arguments[: len(leading)] != leading or len(schema.returns) < results:
            gaps.append(f"aten.{name} with the arguments ({', '.join(leading)})")
    return gaps


def check_torch() -> None:
    """Raise UserError (`error: torch ...`) when the installed torch lacks a private API seqpar calls."""
    gaps = missing_apis()
    if gaps:
        more = f" (and {len(gaps) - 1} more)" if len(gaps) > 1 else ""
        raise UserError("torch", f"{torch.__version__} lacks {gaps[0]}{more}, which seqpar calls (tested with torch "
                          f"{TESTED})", f"install a torch in seqpar's range: pip install '{REQUIREMENT}' (see the "
                          "README's 'Which torch build')")


def flatten_axes(device_mesh, axes: tuple[str, ...], name: str) -> None:
    """Add `name` to the DeviceMesh: the axes `axes` as one (its process group spans them)."""
    device_mesh[axes]._flatten(name)


def unflatten_axis(device_mesh, sizes: tuple[int, ...], names: tuple[str, ...]):
    """The 1-D DeviceMesh `device_mesh` viewed as a mesh of shape `sizes` with axes `names` (row-major: its rank i
    at the coordinates of i); every rank of the whole mesh calls it together (it makes the axes' process groups)."""
    return device_mesh._unflatten(0, sizes, names)


def default_store():
    """The default process group's key-value store (hosted by rank 0; it outlives the process group)."""
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group=None) -> None:
    """Every rank's `tensor` into `output`, concatenated along dim 0: `dist.all_gather_single`, which torch 2.13
    named so; before, the same collective is `all_gather_into_tensor` (GPU images often ship an older torch)."""
    import torch.distributed as dist

    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, tensor, group=group)


def reduce_scatter_single(output: torch.Tensor, tensor: torch.Tensor, group=None) -> None:
    """The sum over ranks of `tensor`'s dim-0 part of this rank, into `output`: `dist.reduce_scatter_single` (torch
    2.13's name; before, `reduce_scatter_tensor`)."""
    import torch.distributed as dist

    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(output, tensor, group=group)


def checkpoint_wrapper(module: torch.nn.Module, checkpoint_fn=None) -> torch.nn.Module:
    """`module` wrapped to recompute its forward in backward (activation checkpointing) with `checkpoint_fn(fn,
    *args, **kwargs)` (None: torch's non-reentrant checkpoint); the wrapped module is the wrapper's
    `CHECKPOINT_WRAPPED` attribute, which parameter names then contain."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as wrap

    return wrap(module, checkpoint_fn=checkpoint_fn)
