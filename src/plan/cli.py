"""Memory planner: which layouts of N devices fit, and what they cost, before a job starts.

    python -m seqpar.plan model=bert_base data.seq_len=65536 trainer.global_batch_size=8 --gpus 64 --gpu-mem-gib 80
    python -m seqpar.plan +experiment=gpt_seq32k --gpus 8 --gpu-mem-gib 40 --json

The command line of `seqpar.plan` (also the console script `seqpar-plan`): composes the config from the same
overrides as train.py, validates it, and prints every layout's estimate from `seqpar.plan.estimate.plan`, best
first (those that fit, by estimated step time at --tflops per device and --gbps per rank, then by memory), as a
table with the best layout's overrides last, or as JSON. With --auto-memory, when nothing fits the config as
given it turns on the memory settings the config leaves unset, cheapest first, as parallel=auto does
(`seqpar.plan.memory`), and prints the first step with which a layout fits. A bad config is one `error:` line and
exit status 2; when nothing fits, exit status 1. The first line of this docstring is the command's --help
description.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from seqpar.cli import compose, describe_hydra_error, fail, with_config_dir
from seqpar.configs import CONFIG_DIR
from seqpar.errors import UserError
from seqpar.plan.estimate import plan
from seqpar.plan.memory import fit_with_memory_settings
from seqpar.validation import validate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m seqpar.plan", description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, required=True, help="devices (ranks) the job will have")
    ap.add_argument("--gpu-mem-gib", type=float, required=True, help="memory per device")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="what the ranks run on (runtime baseline)")
    ap.add_argument("--tflops", type=float, default=400.0, help="sustained TFLOP/s per device, for the step time")
    ap.add_argument("--gbps", type=float, default=100.0, help="GB/s per rank for collectives, for the step time")
    ap.add_argument("--auto-memory", action="store_true",
                    help="when nothing fits, turn on the memory settings left unset as parallel=auto does "
                         "(activation checkpointing, tiled MLPs, offload on cuda; cheapest first)")
    ap.add_argument("--json", action="store_true", help="print the estimates as JSON")
    ap.add_argument("--top", type=int, default=20, help="rows to print (the table)")
    ap.add_argument("--config-dir", "-cd", help="a directory of your own configs, searched after seqpar's (as Hydra's)")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = compose(CONFIG_DIR, with_config_dir(overrides, args.config_dir) if args.config_dir else overrides)
        validate(cfg, layout=False)  # the planner checks each layout it considers
    except UserError as e:
        fail(str(e))
    except Exception as e:
        fail(describe_hydra_error(e))
    if args.gpus < 1:
        fail("--gpus is below 1; pass the number of devices")
    turned_on, why = [], ""
    if args.auto_memory:
        fit = fit_with_memory_settings(cfg, args.gpus, args.gpu_mem_gib, args.device, args.tflops, args.gbps)
        cfg, rows, turned_on = fit.cfg, fit.rows, fit.turned_on
        why = f"; turned on {fit.why()}" if turned_on else ""
    else:
        rows = plan(cfg, args.gpus, args.gpu_mem_gib, args.device, args.tflops, args.gbps)
    if args.json:
        extra = {"memory_settings": turned_on} if args.auto_memory else {}
        print(json.dumps([{**dataclasses.asdict(e), "layout": e.layout, "peak_mib": e.peak_mib, **extra} for e in rows],
                         indent=1))
        return
    print(f"{cfg.model.name}, {cfg.data.seq_len} tokens x {cfg.trainer.global_batch_size} sequences per step, "
          f"{args.gpus} x {args.gpu_mem_gib:g} GiB, engine {cfg.trainer.engine}, sp_impl {cfg.parallel.sp_impl}"
          f"{', activation checkpointing' if cfg.trainer.activation_checkpointing else ''}"
          f"{' (block inputs offloaded to host memory)' if cfg.trainer.activation_checkpointing == 'offload' else ''}")
    print(f"{'layout':<22}{'micro':>6}{'params+grads+optim':>20}{'activations':>13}{'logits':>9}{'peak GiB':>10}"
          f"{'comm MiB/step':>15}{'step s':>10}  fits")
    for e in rows[: args.top]:
        states = e.params_mib + e.grads_mib + e.optimizer_mib
        print(f"{e.layout:<22}{e.micro_batch_size:>6}{states / 1024:>19.2f}G{e.activations_mib / 1024:>12.2f}G"
              f"{e.logits_mib / 1024:>8.2f}G{e.peak_mib / 1024:>10.2f}{e.comm_mib_per_step:>15.0f} {e.step_s:>9.3f}  "
              f"{'yes' if e.fits else 'no'}")
    fitting = [e for e in rows if e.fits]
    if not fitting:
        tried = f" (even with {' '.join(turned_on)})" if turned_on else ""
        memory = "" if turned_on else "use trainer.activation_checkpointing=true (or --auto-memory), "
        print(f"nothing fits{tried}: raise --gpus, {memory}a smaller micro-batch, or trainer.engine=deepspeed",
              file=sys.stderr)
        raise SystemExit(1)
    best = fitting[0]
    print(f"best: parallel.dp={best.dp} parallel.pp={best.pp} parallel.tp={best.tp} parallel.sp={best.sp}"
          + (f" trainer.micro_batch_size={best.micro_batch_size}" if best.pp == 1 else "")
          + "".join(f" {o}" for o in turned_on)
          + f"  ({best.peak_mib / 1024:.2f} GiB of {args.gpu_mem_gib:g}; the shortest estimated step of those that fit, "
          f"then the largest micro-batch{why})")
