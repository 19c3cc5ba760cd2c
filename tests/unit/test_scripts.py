"""The user scripts that need no training: run plots from metrics.jsonl, and the wandb dashboard definition."""

from __future__ import annotations

import json
import subprocess
import sys

from ..conftest import CONFIG_DIR, ROOT


def test_plot_runs_draws_every_run(tmp_path):
    for name, ranks in (("a", 1), ("b", 4)):
        run = tmp_path / name
        run.mkdir()
        lines = []
        for step in range(1, 6):
            rec = {"step": step, "loss": 8 - 0.1 * step, "tokens": 2048 * step, "tokens_per_s": 5000.0 + step,
                   "peak_mem_mib": 400.0 + step}
            if ranks > 1:
                rec["peak_mem_mib_per_rank"] = [400.0 + step - r for r in range(ranks)]
            lines.append(json.dumps(rec))
        lines.append(json.dumps({"step": 5, "eval_loss": 7.4}))
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "plots" / "runs.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_runs.py"), str(tmp_path / "a"),
                           str(tmp_path / "b"), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_runs.py"), str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "has no metrics.jsonl" in bad.stderr


def _import_script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_plot_axes_count_tokens_in_readable_units(tmp_path):
    plot_runs = _import_script("plot_runs")
    assert [plot_runs.human_count(x) for x in (0, 7, 950, 50_000, 100_000, 150_000, 1_200_000, 999_999, 2.5e9)] == [
        "0", "7", "950", "50K", "100K", "150K", "1.2M", "1M", "2.5B"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"step": s, "loss": 8 - 0.1 * s, "tokens": 50_000 * s, "tokens_per_s": 120_000.0, "peak_mem_mib": 400.0})
        for s in range(1, 5)) + "\n")
    fig = plot_runs.figure([run])
    ax_loss, ax_tps, _ = fig.axes
    assert ax_loss.xaxis.get_major_formatter()(150_000) == "150K"
    assert ax_tps.yaxis.get_major_formatter()(1_200_000) == "1.2M"
    __import__("matplotlib.pyplot").pyplot.close(fig)


def test_wandb_dashboard_is_built_offline():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from wandb_dashboard import build_workspace
    finally:
        sys.path.pop(0)
    ws = build_workspace("my-team", "seqpar")
    assert (ws.entity, ws.project) == ("my-team", "seqpar")
    sections = {s.name: s for s in ws.sections}
    assert {"Loss", "Throughput", "Memory", "Optimization", "System"} <= set(sections)
    ys = {y for s in ws.sections for p in s.panels for y in p.y}
    assert {"loss", "eval_loss", "tokens_per_s", "mfu", "peak_mem_mib", "grad_norm", "lr"} <= ys
    assert sections["Loss"].panels[0].x == "tokens"  # loss against tokens seen, comparable across batch sizes
    assert any(p.metric_regex and "rank" in p.metric_regex for p in sections["Memory"].panels)


def test_mfu_benchmark_reports_the_trainers_rate_against_the_given_peak(tmp_path, cache_dir):
    """scripts/bench/mfu.py runs train.py and reports the median tokens/s and MFU of the steps after warm-up; the MFU
    is tokens/s x the model's FLOPs per token / the peak it was given."""
    from seqpar.cli import compose
    from seqpar.models import build_model
    from seqpar.trainer.metrics import flops_per_token

    from ..conftest import cli_env

    out = tmp_path / "mfu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "mfu.py"), "--model", "gpt_tiny",
                           "--seq", "64", "--batch", "4", "--steps", "4", "--warmup", "1", "--device", "cpu",
                           "--threads", "1", "--peak-tflops", "1", "--json", str(out)],
                          cwd=ROOT, env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["peak_flops"] == 1e12
    (row,) = report["rows"]
    assert (row["seq"], row["batch"], row["steps"], row["precision"]) == (64, 4, 3, "fp32")
    cfg = compose(CONFIG_DIR, ["model=gpt_tiny", "data.seq_len=64", "model.max_seq_len=64"])
    flops = flops_per_token(build_model(cfg.model), cfg.model, 64)
    assert 0 < row["mfu"] < 1
    # medians of per-step values: equal when the median step is the same for both (odd count of steps)
    assert abs(row["mfu"] - row["tokens_per_s"] * flops / 1e12) / row["mfu"] < 1e-3
    assert f"| gpt_tiny | 64 | 4 | cpu | fp32 | {row['tokens_per_s']:.0f} | {row['mfu']:.1%} |" in proc.stdout
