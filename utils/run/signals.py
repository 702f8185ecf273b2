"""Preemption: a signal (or SLURM's stop file) asks a stage to checkpoint and stop between steps.

The training loop polls `StopOnSignal.requested`; after its checkpoint it raises
`Preempted`, which the stage CLI turns into the exit code that requeues the job.
"""
from __future__ import annotations

import os
import signal


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; rerun to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopOnSignal:
    """Records SIGUSR1 / SIGTERM / SIGINT (Ctrl-C) so the loop can checkpoint and stop between steps.

    A stop file (MONO_STOP_FILE) counts as SIGUSR1 once it exists: a SLURM batch script creates
    it when warned, since under srun + torchrun it cannot signal the training processes itself.
    """

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT),
                 stop_file: str | None = None):
        self.signum, self.stop_file = None, stop_file or os.environ.get("MONO_STOP_FILE")
        self.reason = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum, self.reason = signum, f"signal {signal.Signals(signum).name}"

    @property
    def requested(self) -> bool:
        if self.signum is None and self.stop_file and os.path.exists(self.stop_file):
            self.signum, self.reason = signal.SIGUSR1, f"stop file {self.stop_file}"
        return self.signum is not None


def ignore_warnings_from_now_on() -> None:
    """Once a stage's work is done, SLURM's warning (USR1, or USR2) has nothing left to stop: ignore it. Left to
    a handler, it can arrive while the interpreter exits, after Python has put the default action (terminate)
    back for every signal it handled, and a finished stage would die with 138 and stop the chain."""
    for s in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
