"""Training: the loop (`loop.py`), the job on its ranks (`job.py`), the optimizer and schedule, the engines,
checkpointing, metrics and loggers."""
