"""Preemption signals: SIGTERM, and SLURM's SIGUSR1 warning ahead of it, make every rank save a checkpoint and stop.

`StopSignal` is the object that carries a received signal from the launcher (which may see it before training
listens) to the training loop; `SignalForwarder` passes the signals a local launcher receives on to its ranks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class StopSignal:
    """The preemption signal (SIGTERM, or SLURM's SIGUSR1 warning ahead of it) this rank has received, 0 while none.

    The job makes one and hands it both to the launcher, which records a signal that arrives before training
    listens (a forked rank inherits the parent's forwarding handler), and to the training loop, which listens with
    `listening()` and stops at the end of the step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = 0

    def record(self, signum, frame=None) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def listening(self):
        """Record SIGTERM/SIGUSR1 here while the block runs (only the main thread can set handlers); the previous
        handlers come back after it."""
        # Interrupted system calls restart (the sockets of collectives).
        with handling(self.SIGNALS, self.record, restart_syscalls=True):
            yield self


@contextlib.contextmanager
def handling(signals, handler, restart_syscalls: bool = False):
    """`handler` for `signals` while the block runs, then the previous handlers again. Only the main thread can set
    handlers: elsewhere nothing changes. A previous handler set outside Python cannot be put back and stays replaced."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
            if restart_syscalls:
                signal.siginterrupt(sig, False)
    try:
        yield
    finally:
        for sig, old in previous.items():
            if old is not None:
                signal.signal(sig, old)


class SignalForwarder:
    """Passes SIGTERM/SIGUSR1 (preemption) on to the local ranks, which save a checkpoint and exit; the parent
    keeps waiting for them. A forked rank inherits this handler until the trainer installs its own: there it only
    records the signal in `stop` (the rank's copy of it), which the trainer then honours."""

    def __init__(self, stop: StopSignal | None):
        self.pid, self.processes, self.stop, self._previous = os.getpid(), [], stop, {}
        for sig in StopSignal.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._forward)

    def _forward(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            if self.stop is not None:
                self.stop.record(signum)
            return
        for p in self.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
