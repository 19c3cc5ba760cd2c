"""The memory settings parallel=auto may turn on, in what order, and the first of them with which a layout fits.

A setting left unset (None in `TrainerConfig`) is parallel=auto's to choose; one given on the command line or in a
config file, even as false, is kept as given. When no layout fits the config as given, `fit_with_memory_settings`
tries these steps in turn, each adding to the ones before, cheapest in step time first:

1. `trainer.activation_checkpointing=true`: each block recomputed in backward (one more forward of the block),
   only its input kept for it;
2. `trainer.tiled_mlp=true`: each MLP a tile of tokens at a time, so its ffn-wide intermediate is never whole; its
   backward recomputes each tile (one more forward of the MLP, a part of the block's) in smaller kernels;
3. `trainer.activation_checkpointing=offload`, on CUDA only: the kept block inputs wait in host memory, copied out
   in forward and back in backward. On a CPU the host memory is the device's own, so it saves nothing there.

`seqpar.plan.auto.choose_layout` (train.py's parallel=auto) and the planner's `--auto-memory` both use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from seqpar.config import Config
from seqpar.plan.estimate import Estimate, plan

# (trainer field, value), in the order they are tried; each step keeps the ones before it.
STEPS = (("activation_checkpointing", True), ("tiled_mlp", True), ("activation_checkpointing", "offload"))


def override(name: str, value: bool | int | str) -> str:
    """`trainer.<name>=<value>` as a command line writes it."""
    return f"trainer.{name}={str(value).lower() if isinstance(value, bool) else value}"


def memory_steps(cfg: Config, device: str) -> list[tuple[list[str], Config]]:
    """The configs to try, in order, each with the overrides it turned on: `cfg` as given (none), then one per step
    whose setting `cfg` leaves unset (offload only on cuda), with the settings of the steps before it."""
    out: list[tuple[list[str], Config]] = [([], cfg)]
    turned: dict[str, bool | str] = {}
    for name, value in STEPS:
        if getattr(cfg.trainer, name) is not None or (value == "offload" and device != "cuda"):
            continue
        turned[name] = value  # offload replaces the step's own `true`, in its place
        trainer = dataclasses.replace(cfg.trainer, **turned)
        out.append(([override(n, v) for n, v in turned.items()], dataclasses.replace(cfg, trainer=trainer)))
    return out


def kept_settings(cfg: Config) -> list[str]:
    """The memory settings `cfg` sets itself, which parallel=auto keeps as they are."""
    names = dict.fromkeys(name for name, _ in STEPS)
    return [override(n, getattr(cfg.trainer, n)) for n in names if getattr(cfg.trainer, n) is not None]


@dataclass
class Fit:
    """The outcome of `fit_with_memory_settings`: the last config tried and its estimates (`fitting`: those that
    fit and are acceptable, best first; empty when even the last step fits nowhere)."""

    turned_on: list[str]  # the overrides of `cfg` that parallel=auto turned on (none: the config as given)
    cfg: Config
    rows: list[Estimate]
    fitting: list[Estimate]
    # Each config tried before this one, as (its overrides, the smallest peak of its layouts in MiB, or None when
    # no layout is valid): why the settings were turned on.
    tried: list[tuple[list[str], float | None]] = field(default_factory=list)

    def why(self) -> str:
        """What was turned on and why: each config tried before fits nowhere."""
        steps = "; ".join(f"{' '.join(on) if on else 'as given'}, "
                          + ("no layout is valid" if peak is None else f"the smallest needs {peak / 1024:.2f} GiB")
                          for on, peak in self.tried)
        return f"{' '.join(self.turned_on)} (cheapest first) since no layout fits with less ({steps})"


def fit_with_memory_settings(cfg: Config, gpus: int, gpu_mem_gib: float, device: str, tflops: float, gbps: float,
                             accept=lambda e: True) -> Fit:
    """Plan `cfg` as given, then with each step of `memory_steps` in turn, until some layout fits (and `accept`s
    it, e.g. has the micro-batch the user set); returns the first such step's plan, or the last step's."""
    tried: list[tuple[list[str], float | None]] = []
    for turned_on, c in memory_steps(cfg, device):
        rows = plan(c, gpus, gpu_mem_gib, device, tflops, gbps)
        fit = Fit(turned_on, c, rows, [e for e in rows if e.fits and accept(e)], list(tried))
        if fit.fitting:
            return fit
        tried.append((turned_on, min((e.peak_mib for e in rows), default=None)))
    return fit
