#!/usr/bin/env python
"""The Python parts of `gpu_checks.sh`: what only a GPU can show about seqpar, one subcommand per part, each writing
a JSON of its results (`ok`, the numbers, the commands it ran; `skipped` where a check means nothing off CUDA).

    python scripts/bench/gpu_checks.py ring --device cuda --json out/ring.json
    python scripts/bench/gpu_checks.py train --device cuda --out out/train --json out/train.json
    python scripts/bench/gpu_checks.py mfu --device cuda --out out/mfu --json out/mfu.json
    python scripts/bench/gpu_checks.py planner --device cuda --out out/planner --json out/planner.json
    python scripts/bench/gpu_checks.py longest --device cuda --budget-s 150 --out out/longest --json out/longest.json
    python scripts/bench/gpu_checks.py merge out            # out/results.json and out/logs.tar.gz

- `ring`: ring attention's whole CUDA path in one process: every rank of a ring is a thread, the ring's exchanges
  and all-gathers local copies between them (`gpu_ring.py`), against SDPA on the whole sequence (float64).
- `train`: `train.py` in bf16 against fp32 over the same steps (the last steps' mean loss within `--loss-rtol`),
  and a bf16 run killed (SIGKILL) once a checkpoint is written, then resumed: its losses against the
  uninterrupted run's.
- `mfu`: `scripts/bench/mfu.py` per model and length, the goal for gpt2_small at 1024 tokens, and the profile's top
  kernels (`profile`) when short of it.
- `throughput`: `throughput.py` per model and length, ours against transformers' model in bf16 on the device (the
  goal: Llama at least 1.2x).
- `planner`: one-process runs' measured peak against the planner's estimate (`seqpar.plan.estimate.plan`).
- `longest`: the longest sequence of llama_1b with the longest-sequence settings that trains here, by doubling,
  then bisecting after an out-of-memory, within a time budget; each attempt's peak against the planner's.
- `merge`: results.json from every part's JSON, and logs.tar.gz: every log, JSON and config under the folder (no
  checkpoints), the whole record in one file to copy off the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from planner_accuracy import MEASURE_ENV  # noqa: E402 - one thread, freed memory returned at once (CPU peaks)

QUIET = ["trainer.eval_every=0", "trainer.eval_batches=1", "trainer.save_final=false", "logger.wandb.mode=disabled"]


# ------------------------------------------------------------------------------------------ running train.py
def train_cmd(overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]


def train_env(device: str) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return env if device == "cuda" else {**env, **MEASURE_ENV}


_CHILDREN: set[subprocess.Popen] = set()  # runs in flight, each its own session (killed with its children)


def _start(cmd: list[str], env: dict, f) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN.add(proc)
    return proc


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _on_term(signum, frame):
    """A part's time cap ran out (`timeout` sends SIGTERM): end the runs it started too, then stop."""
    for proc in list(_CHILDREN):
        _kill(proc)
    raise SystemExit(128 + signum)


def run_logged(cmd: list[str], log: Path, env: dict, timeout: float | None = None) -> dict:
    """Run `cmd` with its output in `log`: {"cmd", "rc", "seconds", "timed_out"}."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = _start(cmd, env, f)
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc, timed_out = proc.wait(), True
        _CHILDREN.discard(proc)
    return {"cmd": shlex.join(cmd), "rc": rc, "seconds": time.monotonic() - start, "timed_out": timed_out}


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if "loss" in r]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "tokens_per_s" in r}


def tail(log: Path, chars: int = 1500) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else ""


# ------------------------------------------------------------------------------------------ ring
def cmd_ring(args) -> dict:
    import torch
    from gpu_ring import ring_cases, run_case

    if args.device == "cuda" and not torch.cuda.is_available():
        return {"ok": False, "error": "no CUDA device"}
    rows = []
    for case in ring_cases(args.device):
        try:
            rows.append(run_case(case, args.device))
        except Exception as e:  # one case's failure is a row of the report, not the end of the part
            rows.append({**case, "ok": False, "error": f"{type(e).__name__}: {e}"})
        r = rows[-1]
        print(("ok  " if r["ok"] else "FAIL") + f" {case}" + (f" {r.get('error', '')}" if not r["ok"] else ""),
              flush=True)
    return {"ok": all(r["ok"] for r in rows), "cases": len(rows), "failed": [r for r in rows if not r["ok"]],
            "rows": rows}


# ------------------------------------------------------------------------------------------ train: bf16, resume
def _kill_after_checkpoint(cmd, run_dir: Path, log: Path, env, timeout: float) -> dict:
    """Run `cmd` until its first complete checkpoint (a step_* directory with meta.json) appears, then SIGKILL it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    ckpts = run_dir / "checkpoints"
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}  # killed once a checkpoint is complete\n")
        f.flush()
        proc = _start(cmd, env, f)
        seen = []
        while proc.poll() is None and time.monotonic() - start < timeout:
            seen = sorted(p.name for p in ckpts.glob("step_*") if (p / "meta.json").is_file()) if ckpts.is_dir() else []
            if seen:
                break
            time.sleep(0.05)
        if proc.poll() is None:
            _kill(proc)
        rc = proc.wait()
        _CHILDREN.discard(proc)
    return {"cmd": shlex.join(cmd), "rc": rc, "seconds": time.monotonic() - start, "killed_at": seen,
            "killed": rc == -signal.SIGKILL and bool(seen)}


def _compare_precisions(bf16: dict[int, float], fp32: dict[int, float], rtol: float) -> dict:
    steps = sorted(set(bf16) & set(fp32))
    if not steps:
        return {"ok": False, "error": "no common logged steps"}
    last = steps[-max(5, len(steps) // 10):]  # the last tenth of the run (at least 5 steps)
    b, f = statistics.mean(bf16[s] for s in last), statistics.mean(fp32[s] for s in last)
    per_step = max(abs(bf16[s] - fp32[s]) / abs(fp32[s]) for s in steps)
    return {"ok": abs(b - f) / abs(f) <= rtol, "steps": len(steps), "last_steps": [last[0], last[-1]],
            "bf16_mean_loss": b, "fp32_mean_loss": f, "rel_diff": (b - f) / f, "max_rel_diff_per_step": per_step,
            "rtol": rtol}


def _compare_resume(full: dict[int, float], resumed: dict[int, float], resumed_from: int, rtol: float) -> dict:
    """The resumed run's losses after its checkpoint against the uninterrupted run's; the steps before it (the same
    run before the kill) show how far two runs of this config differ at all (nondeterministic kernels)."""
    before = [s for s in sorted(full) if s <= resumed_from and s in resumed]
    after = [s for s in sorted(full) if s > resumed_from and s in resumed]
    if not after:
        return {"ok": False, "error": f"no resumed steps after step {resumed_from}", "resumed_from": resumed_from}
    diff_before = max((abs(full[s] - resumed[s]) for s in before), default=0.0)
    diffs = [abs(full[s] - resumed[s]) / abs(full[s]) for s in after]
    equal = all(full[s] == resumed[s] for s in after)
    return {"ok": equal or max(diffs) <= rtol, "equal": equal, "resumed_from": resumed_from,
            "steps_compared": [after[0], after[-1]], "first_resumed_step_abs_diff": abs(full[after[0]] - resumed[after[0]]),
            "max_rel_diff": max(diffs), "rtol_if_not_equal": rtol, "before_kill_equal": diff_before == 0.0,
            "before_kill_max_abs_diff": diff_before}


def cmd_train(args) -> dict:
    env = train_env(args.device)
    out = Path(args.out)
    jobs = []  # (model, name, kind, overrides)
    for model in args.models:
        base = [f"model={model}", f"data.seq_len={args.seq}", f"model.max_seq_len={args.seq}",
                f"trainer.global_batch_size={args.batch}", f"trainer.max_steps={args.steps}", "trainer.log_every=1",
                f"trainer.warmup_steps={max(1, args.steps // 10)}", f"device={args.device}", *QUIET, *args.extra]
        if args.threads:
            base.append(f"trainer.threads={args.threads}")
        no_ckpt = ["checkpoint.every=0", "checkpoint.at_end=false"]
        jobs += [(model, "bf16", "run", [*base, "trainer.precision=bf16", *no_ckpt]),
                 (model, "fp32", "run", [*base, "trainer.precision=fp32", *no_ckpt]),
                 (model, "bf16_killed", "kill", [*base, "trainer.precision=bf16", f"checkpoint.every={args.ckpt_every}",
                                                 "checkpoint.at_end=false", "checkpoint.keep=0"])]
    results: dict[tuple[str, str], dict] = {}

    def first_phase(job):
        model, name, kind, overrides = job
        run_dir = out / model / name
        cmd = train_cmd(overrides, run_dir)
        log = out / model / f"{name}.log"
        if kind == "kill":
            results[model, name] = _kill_after_checkpoint(cmd, run_dir, log, env, args.timeout)
            if results[model, name]["killed"]:  # the same command again: checkpoint.resume=auto continues
                results[model, "resumed"] = run_logged(cmd, log, env, args.timeout)
        else:
            results[model, name] = run_logged(cmd, log, env, args.timeout)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(first_phase, jobs))
    report = {}
    for model in args.models:
        runs = {name: r for (m, name), r in results.items() if m == model}
        row: dict = {"runs": runs}
        failed = [n for n, r in runs.items() if r["rc"] != 0 and n != "bf16_killed"]
        if failed or not runs["bf16_killed"]["killed"]:
            row["ok"] = False
            row["error"] = (f"runs failed: {failed}" if failed else "the run was not killed after a checkpoint "
                            "(it ended first, or none was written)")
            row["log_tail"] = {n: tail(out / model / f"{n if n != 'resumed' else 'bf16_killed'}.log") for n in failed}
            report[model] = row
            continue
        bf16, fp32, killed = (losses(out / model / n) for n in ("bf16", "fp32", "bf16_killed"))
        row["bf16_vs_fp32"] = _compare_precisions(bf16, fp32, args.loss_rtol)
        step = int(runs["bf16_killed"]["killed_at"][-1].split("_")[-1])
        row["resume"] = _compare_resume(bf16, killed, step, args.resume_rtol)
        row["optimizer_state_on_device"] = args.device == "cuda"  # fused AdamW refuses a step with CPU state on CUDA
        row["ok"] = row["bf16_vs_fp32"]["ok"] and row["resume"]["ok"]
        report[model] = row
    return {"ok": all(r["ok"] for r in report.values()), "models": report}


# ------------------------------------------------------------------------------------------ mfu and profile
def run_per_spec(args, script: str, *flags: str) -> tuple[list[dict], list[dict], bool]:
    """`script` (a benchmark beside this file) once per model:seq:batch of `args.runs`, each writing its JSON into
    `args.out`: (each run's JSON, or an error row with its log's tail; the commands; whether all succeeded)."""
    out = Path(args.out)
    results, cmds, ok = [], [], True
    for spec in args.runs:
        model, seq, batch = spec.split(":")
        dest = out / f"{model}_{seq}.json"
        cmd = [sys.executable, str(HERE / script), "--model", model, "--seq", seq, "--batch", batch,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--json", str(dest),
               *flags]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        r = run_logged(cmd, out / f"{model}_{seq}.log", train_env(args.device), args.timeout)
        cmds.append(r)
        if r["rc"] != 0 or not dest.is_file():
            ok = False
            results.append({"model": model, "seq": int(seq), "batch": int(batch),
                            "error": tail(out / f"{model}_{seq}.log")})
            continue
        results.append(json.loads(dest.read_text()))
    return results, cmds, ok


def cmd_mfu(args) -> dict:
    out = Path(args.out)
    results, cmds, ok = run_per_spec(args, "mfu.py")
    rows = [row for r in results for row in r.get("rows", [r])]  # mfu.py's rows; an error row as it is
    report = {"ok": ok, "rows": rows, "commands": cmds}
    goal_model, goal_seq = args.goal.split(":")
    goal = next((r for r in rows if r["model"] == goal_model and r["seq"] == int(goal_seq) and "mfu" in r), None)
    if args.device != "cuda":
        report["goal"] = {"skipped": "cpu", "target": args.goal_mfu}
    elif goal is None:
        report["goal"] = {"ok": False, "error": f"no MFU for {args.goal}", "target": args.goal_mfu}
    else:
        report["goal"] = {"ok": goal["mfu"] >= args.goal_mfu, "mfu": goal["mfu"], "target": args.goal_mfu}
    short = report["goal"].get("ok") is False
    if args.profile == "always" or (args.profile == "auto" and short):
        batch = next(s.split(":")[2] for s in args.runs if s.startswith(f"{goal_model}:{goal_seq}:"))
        overrides = [f"model={goal_model}", f"data.seq_len={goal_seq}", f"model.max_seq_len={goal_seq}",
                     f"trainer.global_batch_size={batch}", f"trainer.max_steps={args.profile_steps}",
                     "trainer.log_every=1", f"device={args.device}", "checkpoint.at_end=false", *QUIET,
                     f"trainer.precision={'bf16' if args.device == 'cuda' else 'fp32'}"]
        if args.threads:
            overrides.append(f"trainer.threads={args.threads}")
        dest = out / "profile.json"
        cmd = [sys.executable, str(HERE / "gpu_checks.py"), "profile", "--json", str(dest),
               "--run-dir", str(out / "profile_run"), "--", *overrides]
        r = run_logged(cmd, out / "profile.log", train_env(args.device), args.timeout)
        report["profile"] = json.loads(dest.read_text()) if r["rc"] == 0 and dest.is_file() else {
            "error": tail(out / "profile.log")}
        report["profile"]["command"] = r["cmd"]
    # Short of the goal is a finding, reported with its profile (the goal's own "ok"), not a broken part.
    report["ok"] = ok and "error" not in report.get("profile", {})
    return report


def cmd_profile(args) -> dict:
    """`train.py` with these overrides, in this process, under torch.profiler: the kernels by device time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from seqpar.train import main as train_main

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sys.argv = [str(REPO / "train.py"), *args.overrides, f"hydra.run.dir={args.run_dir}"]
    with profile(activities=acts) as prof:
        try:
            train_main()
        except SystemExit as e:
            if e.code:
                raise
    cuda = torch.cuda.is_available()
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1.0
    top = sorted(events, key=key, reverse=True)[: args.top]
    print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=args.top))
    return {"ok": True, "time": "device" if cuda else "cpu (self)", "overrides": args.overrides,
            "top": [{"name": e.key, "self_ms": key(e) / 1e3, "share": key(e) / total, "calls": e.count} for e in top]}


# ------------------------------------------------------------------------------------------ planner
def planner_estimate(overrides: list[str], device: str, mem_gib: float):
    """The planner's one-process row (micro-batch = the global batch) for these train.py overrides."""
    from seqpar.cli import compose
    from seqpar.configs import CONFIG_DIR
    from seqpar.plan.estimate import plan

    cfg = compose(CONFIG_DIR, overrides)
    rows = [r for r in plan(cfg, gpus=1, gpu_mem_gib=mem_gib, device=device)
            if r.micro_batch_size == cfg.trainer.global_batch_size]
    return rows[0]


def device_mem_gib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def compare_peak(overrides: list[str], run_dir: Path, device: str, mem_gib: float, rtol: float) -> dict:
    """A finished run's peak against the planner's: on CUDA the allocator's share of the estimate (without the CUDA
    context, which `max_memory_allocated` does not see) against `max_memory_allocated`; on CPU the whole estimate
    against the peak resident set."""
    recs = records(run_dir)
    est = planner_estimate(overrides, device, mem_gib)
    measured = max(r["peak_mem_mib"] for r in recs)
    estimate = est.peak_mib - (est.runtime_mib if device == "cuda" else 0.0)
    row = {"measured_mib": measured, "estimate_mib": estimate, "estimate_with_runtime_mib": est.peak_mib,
           "error": estimate / measured - 1, "ok": abs(estimate / measured - 1) <= rtol,
           "estimate_parts_mib": {k: getattr(est, k) for k in ("params_mib", "grads_mib", "optimizer_mib",
                                                              "activations_mib", "logits_mib", "backward_mib",
                                                              "runtime_mib")}}
    reserved = [r["peak_reserved_mib"] for r in recs if "peak_reserved_mib" in r]
    if reserved:
        row["reserved_mib"] = max(reserved)
    return row


def cmd_planner(args) -> dict:
    env = train_env(args.device)
    out = Path(args.out)
    mem = device_mem_gib(args.device)
    configs = {}
    for spec in args.configs:  # name=overrides, space-separated
        name, _, rest = spec.partition("=")
        configs[name] = [*rest.split(), f"device={args.device}", "trainer.max_steps=2", "trainer.log_every=1",
                         "checkpoint.at_end=false", "checkpoint.every=0", *QUIET]
        if args.threads:
            configs[name].append(f"trainer.threads={args.threads}")

    slug = {name: name.replace(" ", "_") for name in configs}

    def one(item):  # runs at once are separate processes: each allocator's peak is its own
        name, overrides = item
        return run_logged(train_cmd(overrides, out / slug[name]), out / f"{slug[name]}.log", env, args.timeout)

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = dict(zip(configs, pool.map(one, configs.items()), strict=True))
    rows = {}
    for name, r in runs.items():  # the estimates here: composing a config is not thread-safe (Hydra's state)
        if r["rc"] != 0:
            rows[name] = {"ok": False, "command": r, "error": tail(out / f"{slug[name]}.log")}
        else:
            rows[name] = {**compare_peak(configs[name], out / slug[name], args.device, mem, args.rtol),
                          "command": r["cmd"]}
    return {"ok": all(r["ok"] for r in rows.values()), "rtol": rtol_note(args.device, args.rtol), "rows": rows}


def rtol_note(device: str, rtol: float) -> str:
    what = ("estimate without the CUDA context vs torch.cuda.max_memory_allocated" if device == "cuda"
            else "estimate vs peak resident set")
    return f"|error| <= {rtol:.0%}: {what}"


# ------------------------------------------------------------------------------------------ longest llama_1b
def planner_longest(overrides_at, device: str, mem_gib: float, unit: int, hi: int) -> int:
    """The longest multiple of `unit` tokens up to `hi` whose one-process estimate fits `mem_gib` (0: none)."""
    lo_ok, n = 0, hi // unit
    lo, top = 1, n
    while lo <= top:
        mid = (lo + top) // 2
        if planner_estimate(overrides_at(mid * unit), device, mem_gib).peak_mib <= mem_gib * 1024:
            lo_ok, lo = mid, mid + 1
        else:
            top = mid - 1
    return lo_ok * unit


def cmd_longest(args) -> dict:
    env = train_env(args.device)
    out = Path(args.out)
    mem = device_mem_gib(args.device)
    deadline = time.monotonic() + args.budget_s

    def overrides_at(seq: int) -> list[str]:
        o = [f"model={args.model}", f"data.seq_len={seq}", f"model.max_seq_len={seq}", "trainer.global_batch_size=1",
             f"device={args.device}", "trainer.max_steps=2", "trainer.log_every=1", "checkpoint.at_end=false",
             "checkpoint.every=0", *QUIET, *args.settings]
        return o + ([f"trainer.threads={args.threads}"] if args.threads else [])

    attempts: list[dict] = []

    def attempt(seq: int) -> dict:
        run_dir = out / f"seq{seq}"
        log = out / f"seq{seq}.log"
        r = run_logged(train_cmd(overrides_at(seq), run_dir), log, env, max(1.0, deadline - time.monotonic()))
        text = tail(log, 4000)
        row = {"seq": seq, "seconds": r["seconds"], "command": r["cmd"]}
        if r["rc"] == 0:
            recs = records(run_dir)
            row.update(trained=True, step_s=seq / recs[-1]["tokens_per_s"],
                       planner=compare_peak(overrides_at(seq), run_dir, args.device, mem, args.rtol))
        else:
            reason = ("timeout" if r["timed_out"] else "oom" if "out of memory" in text.lower() else "error")
            row.update(trained=False, reason=reason, log_tail=text[-1500:])
        attempts.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("log_tail", "command")}), flush=True)
        return row

    def affordable(prev: dict, seq: int) -> bool:
        """Whether an attempt at `seq` should end before the deadline: the previous attempt's start-up plus two steps
        and an evaluation, its step time scaled by the attention's quadratic cost."""
        step = prev["step_s"] * (seq / prev["seq"]) ** 2
        startup = max(0.0, prev["seconds"] - 3 * prev["step_s"])
        return startup + 3 * step <= deadline - time.monotonic()

    seq, good, bad, stop = args.start, None, None, "attempts"
    while len(attempts) < args.max_attempts:
        if good and not affordable(good, seq):
            stop = "time (the next attempt would not end within the budget)"
            break
        row = attempt(seq)
        if row["trained"]:
            good = row
            if bad is None:
                seq *= 2
                continue
        else:
            if row["reason"] != "oom":
                stop = row["reason"]
                break
            bad = row
        if good is None:  # out of memory at the first length
            stop = "oom at the first length"
            break
        nxt = (good["seq"] + bad["seq"]) // 2 // args.unit * args.unit
        if nxt <= good["seq"]:
            stop = "bisected to the unit"
            break
        seq = nxt
    else:
        stop = f"{args.max_attempts} attempts"
    est_longest = planner_longest(overrides_at, args.device, mem, args.unit, args.planner_max)
    trained = [a for a in attempts if a["trained"]]
    longest = max(trained, key=lambda a: a["seq"]) if trained else None
    within = all(a["planner"]["ok"] for a in trained)
    report = {"model": args.model, "settings": args.settings, "device_mem_gib": mem, "attempts": attempts,
              "stopped": stop, "longest_trained": longest["seq"] if longest else None,
              "first_oom": bad["seq"] if bad else None, "planner_longest": est_longest,
              "planner_within_rtol_at_every_trained_length": within, "rtol": rtol_note(args.device, args.rtol)}
    if args.device != "cuda":
        report["oom_search"] = "skipped: cpu (no device memory limit to reach)"
    report["ok"] = bool(trained) and within
    return report


def cmd_throughput(args) -> dict:
    """`throughput.py` per model:seq:batch (ours against transformers' model, bf16 autocast, one device); the goal:
    Llama at least `--goal-speedup` times faster."""
    rows, cmds, ok = run_per_spec(args, "throughput.py", "--precision", args.precision)
    goal = next((r for r in rows if r["model"] == args.goal and "speedup" in r), None)
    report = {"ok": ok, "rows": rows, "commands": cmds}
    if goal is None:
        report["goal"] = {"ok": False, "error": f"no speedup for {args.goal}", "target": args.goal_speedup}
    else:
        report["goal"] = {"ok": goal["speedup"] >= args.goal_speedup, "speedup": goal["speedup"],
                          "target": args.goal_speedup}
    return report


# ------------------------------------------------------------------------------------------ junit, env, merge
def cmd_junit(args) -> dict:
    """pytest's junit XML as counts, the failures and the skips' reasons."""
    root = ET.parse(args.xml).getroot()
    cases = list(root.iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None
              or c.find("error") is not None]
    skipped = [(f"{c.get('classname')}::{c.get('name')}", c.find("skipped").get("message", ""))
               for c in cases if c.find("skipped") is not None]
    report = {"ok": not failed and bool(cases), "tests": len(cases), "passed": len(cases) - len(failed) - len(skipped),
              "failed": failed, "skipped_tests": len(skipped), "skip_reasons": sorted({m for _, m in skipped})}
    if args.device != "cuda" and skipped:
        report["skipped"] = "cpu"  # the CUDA tests among them
    return report


def cmd_env(args) -> dict:
    import torch
    import transformers

    import seqpar

    info = {"ok": True, "python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
            "seqpar_from": str(Path(seqpar.__file__).parent), "device": args.device, "cpus": os.cpu_count()}
    try:  # a copy of the checkout without its .git, or a machine without git: no commit
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        info["commit"] = git.stdout.strip() or None
    except OSError:
        info["commit"] = None
    if args.device == "cuda":
        if not torch.cuda.is_available():
            return {**info, "ok": False, "error": "torch sees no CUDA device"}
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}",
                    cudnn=torch.backends.cudnn.version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True)
            info["nvidia_smi"] = smi.stdout.strip()
        except OSError:
            info["nvidia_smi"] = None
    return info


def cmd_merge(args) -> dict:
    """results.json: every part's JSON and status (rc, seconds, timed out), in the order the parts ran."""
    out = Path(args.dir)
    parts = {}
    status_file = out / "status.tsv"
    lines = status_file.read_text().splitlines() if status_file.is_file() else []
    for line in lines:
        name, rc, seconds, cmd = line.split("\t", 3)
        rc = int(rc)
        entry = {"rc": rc, "seconds": float(seconds), "timed_out": rc in (124, 137), "command": cmd,
                 "log": f"{name}.log"}
        part_json = out / f"{name}.json"
        if part_json.is_file():
            entry.update(json.loads(part_json.read_text()))
        else:
            entry.update(ok=False, error="no results (the part " + ("ran past its time cap" if entry["timed_out"]
                                                                     else f"exited with {rc}") + ")",
                         log_tail=tail(out / f"{name}.log"))
        if rc != 0 and entry.get("ok"):
            entry["ok"] = False
        parts[name] = entry
    env = out / "env.json"
    return {"ok": bool(parts) and all(p.get("ok") for p in parts.values()),
            "summary": {n: ("ok" if p.get("ok") else "FAILED") + (f" (skipped: {p['skipped']})" if p.get("skipped")
                                                                  else "") for n, p in parts.items()},
            "env": json.loads(env.read_text()) if env.is_file() else None, "parts": parts}


BUNDLE = "logs.tar.gz"
BUNDLED = {".json", ".jsonl", ".log", ".tsv", ".xml", ".txt", ".yaml"}  # results and configs; never checkpoints


def write_bundle(out: Path, max_file_bytes: int = 4 * 2**20) -> dict:
    """out/logs.tar.gz: every file under `out` with a suffix in BUNDLED and at most `max_file_bytes` (a profile's
    trace can be larger), by its path under `out`; what was left out for its size is listed."""
    left_out, count = [], 0
    with tarfile.open(out / BUNDLE, "w:gz") as tar:
        for f in sorted(out.rglob("*")):
            if not f.is_file() or f.suffix not in BUNDLED:
                continue
            if f.stat().st_size > max_file_bytes:
                left_out.append(str(f.relative_to(out)))
                continue
            tar.add(f, arcname=str(f.relative_to(out)))
            count += 1
    return {"file": BUNDLE, "files": count, "left_out_for_size": left_out}


# ------------------------------------------------------------------------------------------ command line
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def part(name, fn, help_):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        p.add_argument("--json", help="write the part's results here")
        if name not in ("merge", "profile"):
            p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        return p

    part("ring", cmd_ring, "ring attention in one process, threads for ranks")
    p = part("train", cmd_train, "bf16 against fp32; killed and resumed")
    p.add_argument("--models", nargs="+", default=["gpt2_small", "bert_base"])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--ckpt-every", type=int, default=100, help="the killed run's checkpoint interval")
    p.add_argument("--loss-rtol", type=float, default=0.02)
    p.add_argument("--resume-rtol", type=float, default=0.01, help="accepted where the losses are not equal")
    p.add_argument("--jobs", type=int, default=6, help="runs at once (they share the device)")
    p.add_argument("--threads", type=int)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", required=True)
    p.add_argument("extra", nargs="*", help="more train.py overrides (after --)")
    p = part("mfu", cmd_mfu, "mfu.py per model and length; the profile when short of the goal")
    p.add_argument("--runs", nargs="+", default=["gpt2_small:1024:16", "gpt2_small:8192:2", "bert_base:512:32",
                                                 "bert_base:8192:2"], help="model:seq:batch")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--goal", default="gpt2_small:1024")
    p.add_argument("--goal-mfu", type=float, default=0.45)
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--threads", type=int)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", required=True)
    p = part("throughput", cmd_throughput, "throughput.py per model and length: ours against transformers'")
    p.add_argument("--runs", nargs="+", default=["llama_125m:1024:8", "gpt2_small:1024:8", "bert_base:512:16"],
                   help="model:seq:batch")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--goal", default="llama_125m")
    p.add_argument("--goal-speedup", type=float, default=1.2)
    p.add_argument("--threads", type=int)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", required=True)
    p = part("profile", cmd_profile, "train.py in this process under torch.profiler")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("overrides", nargs="*")
    p = part("planner", cmd_planner, "measured peaks against the planner")
    p.add_argument("--configs", nargs="+", required=True, help="'name=override override ...'")
    p.add_argument("--rtol", type=float, default=0.10)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--threads", type=int)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", required=True)
    p = part("longest", cmd_longest, "the longest sequence that trains, against the planner")
    p.add_argument("--model", default="llama_1b")
    p.add_argument("--settings", nargs="*", default=[
        "trainer.precision=bf16", "trainer.fused_loss=true", "trainer.tiled_mlp=true",
        "trainer.activation_checkpointing=offload", "data.document_mask=false"])
    p.add_argument("--start", type=int, default=32768)
    p.add_argument("--unit", type=int, default=4096, help="bisection stops at this many tokens")
    p.add_argument("--max-attempts", type=int, default=6)
    p.add_argument("--budget-s", type=float, default=150)
    p.add_argument("--planner-max", type=int, default=8 * 2**20, help="the planner's search goes up to this")
    p.add_argument("--rtol", type=float, default=0.10)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", required=True)
    p = part("junit", cmd_junit, "a pytest junit XML as JSON")
    p.add_argument("xml")
    p = part("env", cmd_env, "versions of the GPU, driver, CUDA and torch")
    p = part("merge", cmd_merge, "results.json from every part's JSON; logs.tar.gz of the folder's records")
    p.add_argument("dir")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    if args.cmd == "merge" and not args.json:
        args.json = str(Path(args.dir) / "results.json")
    result = args.fn(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.cmd == "merge":  # after results.json, which it holds too
        result["bundle"] = write_bundle(Path(args.dir))
    print(json.dumps({k: v for k, v in result.items() if k in ("ok", "summary", "skipped", "error", "goal", "bundle")}))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
