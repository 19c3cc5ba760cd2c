"""The user scripts that need no training: run plots from metrics.jsonl, and the wandb dashboard definition."""

from __future__ import annotations

import json
import subprocess
import sys

from ..conftest import ROOT


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
