"""Training: the loop (`loop.py`) and what a step computes (`step.py`), the job on its ranks (`job.py`), the optimizer
and schedule, the engines, checkpointing, metrics and loggers."""
