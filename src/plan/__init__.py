"""The memory planner: which layouts of N devices fit, and what they cost, before a job starts.

    estimate.py  the estimate: per-rank memory, communication and step time of every layout (`plan`, `estimate`,
                 `Estimate`), by arithmetic
    baseline.py  the runtime baseline the estimate adds: a constant on GPU, measured on CPU by running probe.py in
                 a fresh interpreter
    probe.py     that measurement: imports the training stack, forks a rank, prints resident memory
    auto.py      parallel=auto: `choose_layout` (called by seqpar.preflight) and `available_devices`
    memory.py    the memory settings left unset that parallel=auto (and cli.py's --auto-memory) turns on, cheapest
                 first, when no layout fits without them (`fit_with_memory_settings`)
    cli.py       the command line, `python -m seqpar.plan` (__main__.py) and the console script `seqpar-plan`

This file imports nothing, so importing one module of the package loads only what that module needs. Above all
not cli.py: it imports seqpar.cli (Hydra), which the estimate and parallel=auto do not need, and seqpar.preflight
imports auto.py, so a command line that imported seqpar.preflight would close a cycle through this file. Nor
probe.py, whose imports are its measurement. Import from the modules: `from seqpar.plan.estimate import plan`,
`from seqpar.plan.auto import choose_layout`.
"""
