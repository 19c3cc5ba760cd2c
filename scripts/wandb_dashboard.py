#!/usr/bin/env python
"""Create the seqpar workspace (a saved dashboard view) in a Weights & Biases project.

    python scripts/wandb_dashboard.py --entity my-team --project seqpar          # saves it, prints its URL
    python scripts/wandb_dashboard.py --entity my-team --project seqpar --dry-run  # prints the panels only

Panels: loss and evaluation loss against tokens seen, throughput (tokens/s, MFU), peak memory per rank, gradient
norm, learning rate and skipped steps, and wandb's system metrics; runs grouped by experiment (seqpar's run group)
so that layouts of one experiment sit side by side. Needs `pip install wandb-workspaces` and, to save, a login.
"""

from __future__ import annotations

import argparse


def build_workspace(entity: str, project: str, name: str = "seqpar training"):
    """The workspace object (no network until `.save()`)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def line(title: str, y: list[str], x: str = "Step", **kw) -> wr.LinePlot:
        return wr.LinePlot(title=title, x=x, y=y, **kw)

    sections = [
        ws.Section(name="Loss", is_open=True, panels=[
            line("training loss against tokens", ["loss"], x="tokens", smoothing_factor=0.6),
            line("evaluation loss against tokens", ["eval_loss"], x="tokens"),
        ]),
        ws.Section(name="Throughput", is_open=True, panels=[
            line("tokens per second", ["tokens_per_s"]),
            line("model FLOPs utilisation", ["mfu"]),
        ]),
        ws.Section(name="Memory", is_open=True, panels=[
            line("peak memory, maximum over ranks (MiB)", ["peak_mem_mib"]),
            line("peak memory per rank (MiB)", [], metric_regex=r"peak_mem_mib/rank_\d+"),
        ]),
        ws.Section(name="Optimization", is_open=True, panels=[
            line("gradient norm (before clipping)", ["grad_norm"], log_y=True),
            line("learning rate", ["lr"]),
            line("skipped non-finite steps", ["skipped_steps"]),
        ]),
        ws.Section(name="System", panels=[
            line("CPU memory used (%)", ["system/memory_percent"]),
            line("GPU utilisation (%)", [], metric_regex=r"system/gpu\.\d+\.gpu$"),
            line("GPU memory allocated (%)", [], metric_regex=r"system/gpu\.\d+\.memoryAllocated$"),
        ]),
    ]
    return ws.Workspace(
        entity=entity, project=project, name=name, sections=sections,
        runset_settings=ws.RunsetSettings(groupby=[ws.Metric("Group")]),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entity", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--name", default="seqpar training")
    parser.add_argument("--dry-run", action="store_true", help="print the panels instead of saving")
    args = parser.parse_args(argv)
    workspace = build_workspace(args.entity, args.project, args.name)
    if args.dry_run:
        for section in workspace.sections:
            print(f"{section.name}: " + "; ".join(p.title for p in section.panels))
        return
    workspace.save()
    print(f"saved workspace {args.name!r}: {workspace.url}")


if __name__ == "__main__":
    main()
