#!/usr/bin/env python
"""Plot loss, throughput and memory of one or more runs from their metrics.jsonl (no wandb needed).

    python scripts/plot_runs.py outputs/2026-11-26/10-00-00 runs/bert-sp4 --out runs.png

Each run directory is one line per panel, labelled with its directory name (or `--labels`). Panels: training
and evaluation loss against tokens seen, tokens per second against step, and peak memory per rank (the maximum,
and each rank's own where it was logged) against step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {run_dir} has no metrics.jsonl; pass run directories of train.py")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def human_count(x: float, pos: int | None = None) -> str:
    """A tick label in readable units: 950, 50K, 1.2M, 3B (three significant digits at most)."""
    if x == 0:
        return "0"
    for i, unit in enumerate(("", "K", "M", "B", "T")):
        text = f"{x / 1000**i:.3g}"
        if abs(float(text)) < 1000 or unit == "T":
            return text + unit
    raise AssertionError("unreachable")


def figure(run_dirs: list[Path], labels: list[str] | None = None):
    """The three panels of the runs, as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (ax_loss, ax_tps, ax_mem) = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, run in enumerate(run_dirs):
        label = labels[i] if labels else run.name
        steps, evals = read_run(run)
        tokens_of = {r["step"]: r["tokens"] for r in steps}
        line = ax_loss.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], label=f"{label} train")[0]
        if evals:
            ax_loss.plot([tokens_of.get(r["step"], 0) for r in evals], [r["eval_loss"] for r in evals], "o--",
                         color=line.get_color(), label=f"{label} eval")
        ax_tps.plot([r["step"] for r in steps], [r["tokens_per_s"] for r in steps], label=label)
        ax_mem.plot([r["step"] for r in steps], [r["peak_mem_mib"] for r in steps], label=f"{label} max",
                    color=line.get_color())
        per_rank = [r.get("peak_mem_mib_per_rank") for r in steps]
        if all(per_rank):
            for rank in range(len(per_rank[0])):
                ax_mem.plot([r["step"] for r in steps], [m[rank] for m in per_rank], ":", color=line.get_color(),
                            alpha=0.5, linewidth=1)
    ax_loss.set(xlabel="tokens", ylabel="loss", title="loss")
    ax_tps.set(xlabel="step", ylabel="tokens / s", title="throughput")
    ax_mem.set(xlabel="step", ylabel="MiB", title="peak memory per rank (dotted: each rank)")
    ax_loss.xaxis.set_major_formatter(FuncFormatter(human_count))  # 50K, 1.2M: not 50000100000150000
    ax_tps.yaxis.set_major_formatter(FuncFormatter(human_count))
    for ax in (ax_loss, ax_tps, ax_mem):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(run_dirs, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("runs.png"))
    parser.add_argument("--labels", nargs="*", help="one label per run (default: directory names)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        raise SystemExit("error: --labels needs one label per run")
    print(f"wrote {plot_runs(args.runs, args.out, args.labels)}")


if __name__ == "__main__":
    main()
