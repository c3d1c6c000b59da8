"""How SIGINT and SIGTERM end a command, as a terminal's Ctrl-C, `timeout`, Slurm and systemd send them.

They signal every process of the job, loader workers included; the workers ignore both
(protloc.data.decoded), so this process alone decides what a signal does:

- any command: the signal raises Stopped where the command is; it ends with one line
  `protloc: stopped by SIGTERM` and exit code 128 + the signal (SIGINT 130, SIGTERM 143). Outputs
  are written atomically at the end, so an output path holds nothing half-written.
- a training loop (`stop_after_step`): the first signal lets the current step finish; pretraining
  then saves a checkpoint, fine-tuning stops without writing anything. A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """The command was stopped by a signal; `detail` says where it stopped and what it left."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum, detail)
        self.signal, self.detail = signal.Signals(signum), detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signal.value

    @property
    def message(self) -> str:
        return f"protloc: stopped by {self.signal.name}" + (f" {self.detail}" if self.detail else "")


def _raise(signum, _frame):
    raise Stopped(signum)


@contextlib.contextmanager
def stopped_by_signals():
    """For the duration of a command: SIGINT and SIGTERM raise Stopped (the handlers before are restored)."""
    previous = {sig: signal.signal(sig, _raise) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def stop_after_step(request_stop=None):
    """Inside a training loop: the first SIGINT / SIGTERM is recorded and calls `request_stop()`
    (the loop stops after its current step); a second raises Stopped at once. Yields the list of
    signals received."""
    received: list[signal.Signals] = []

    def handler(signum, _frame):
        if received:
            raise Stopped(signum)
        received.append(signal.Signals(signum))
        if request_stop is not None:
            request_stop()

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
