"""The runtime baseline: the memory a rank uses before it holds any tensor of its own.

On GPU it is a CUDA context, a constant. On CPU it depends on the libraries a rank has loaded and on how the rank
was started, so it is measured: `seqpar.plan.probe` runs in a fresh interpreter (this process may hold much more
than a rank would: a test runner, a notebook) and reports both a rank forked by the local launcher and a rank that
is a whole process. This module only starts that process and reads its answer; it never imports the probe, whose
imports are what the probe measures.
"""

from __future__ import annotations

import functools
import subprocess
import sys

PROBE = "from seqpar.plan.probe import _rank_baseline_probe; _rank_baseline_probe({engine!r})"


@functools.cache
def runtime_baseline_mib(device: str, world: int = 2, engine: str = "seqpar") -> float:
    """Memory a rank uses before it holds any tensor: a CUDA context on GPU; on CPU, what `_rank_baseline_probe`
    measures in a fresh process: a rank forked by the local launcher when `world` > 1, the whole process when the
    job is one process; with `engine="deepspeed"`, also DeepSpeed's code and bookkeeping (host memory on a GPU,
    which the device's peak does not see)."""
    if device == "cuda":
        return 600.0
    out = subprocess.run([sys.executable, "-c", PROBE.format(engine=engine)], capture_output=True, text=True,
                         check=True).stdout
    forked, single = (float(x) for x in out.split()[-2:])
    return single if world == 1 else forked
