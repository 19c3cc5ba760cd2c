#!/usr/bin/env python
"""Start-up memory of each rank: the resident high-water mark while a rank builds its part of the model.

For each layout, fresh gloo processes (one thread each) build their model as the trainer does
(`seqpar.trainer.weights.build_rank_model`: meta device, sp/tp, pipeline pruning, then allocation and initialisation
of what the rank holds) and report how much their resident high-water mark grew, beside the bytes of the
parameters they hold. `--whole-first` adds, for comparison, the way that needs the whole model on every rank:
build and initialise it on the device, then shard and prune it.

    python scripts/bench/startup_memory.py --model gpt2_medium
    python scripts/bench/startup_memory.py --model gpt2_medium --layouts "pp=2" "tp=2" --whole-first --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = {"one process": {}, "pp=2": {"pp": 2, "microbatches": 2}, "tp=2": {"tp": 2}}
MIB = 2**20


def _rank(model: str, layout: dict, whole_first: bool, out: str) -> None:
    import torch.distributed as dist

    from seqpar.cli import compose
    from seqpar.parallel.mesh import ParallelMesh

    torch.set_num_threads(1)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    overrides = [f"model={model}", *(f"parallel.{k}={v}" for k, v in layout.items())]
    cfg = compose(REPO / "configs", overrides)
    mesh = ParallelMesh.from_config(cfg.parallel, torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if whole_first:
        model_ = _whole_then_shard(cfg, mesh)
    else:
        from seqpar.trainer.weights import build_rank_model

        model_, _, _ = build_rank_model(cfg, mesh, lambda y, t: y.sum())
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    held = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model_.parameters())
    rows = [None] * world if world > 1 else None
    row = {"rank": rank, "grown_mib": grown / MIB, "params_mib": held / MIB}
    if world > 1:
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def _whole_then_shard(cfg, mesh):
    """The whole model initialised on the device, then sharded and pruned (every rank holds it all for a while)."""
    from seqpar.models import build_model
    from seqpar.parallel.parallelize import parallelize
    from seqpar.trainer.weights import WRAPPER

    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model, "cpu")
    whole = {k: v.detach() for k, v in model.state_dict().items()}  # kept alive while the shards are made
    parallelize(model, mesh, cfg, lambda name, shape: whole[name.replace(WRAPPER, "")], lambda y, t: y.sum())
    return model


def measure(model: str, layout: dict, whole_first: bool) -> list[dict]:
    from seqpar.parallel.launch import launch_local

    world = 1
    for k in ("pp", "tp", "dp", "sp"):
        world *= layout.get(k, 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        if world == 1:
            # A fresh process too, so that the high-water mark starts from the imports alone.
            import subprocess

            code = (f"import sys; sys.path.insert(0, {str(REPO / 'scripts' / 'bench')!r}); import startup_memory as s; "
                    f"s._rank({model!r}, {{}}, {whole_first!r}, {out!r})")
            subprocess.run([sys.executable, "-c", code], check=True)
        else:
            launch_local(_rank, world, model, layout, whole_first, out, timeout_s=1800, deadline_s=1800)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2_medium")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--whole-first", action="store_true", help="also measure building the whole model first")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    results = []
    print("| layout | build | rank | parameters held (MiB) | high-water mark growth (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.layouts:
        for whole_first in ([False, True] if args.whole_first else [False]):
            for row in measure(args.model, LAYOUTS[name], whole_first):
                how = "whole model first" if whole_first else "rank's part (meta)"
                print(f"| {name} | {how} | {row['rank']} | {row['params_mib']:.0f} | {row['grown_mib']:.0f} |",
                      flush=True)
                results.append({"layout": name, "whole_first": whole_first, **row})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
