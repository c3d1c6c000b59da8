"""Progress of a training loop for logs: one status line at a steady pace when stderr is no terminal.

A batch job's or `make demo`'s log has no use for a tqdm bar (it redraws with carriage returns)
and must not be minutes of silence either. The rule: a line after the first step (the run works,
and how fast), then one whenever PROTLOC_STATUS_EVERY seconds (default 30) have passed since the
last, e.g.

    protloc: step 40/1000, loss 8.1234, 95.1 img/s, ETA 0:12:30

img/s is measured since the previous line; ETA extrapolates the pace since the start. On a
terminal the commands keep their tqdm bars; --quiet prints neither.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import click

EVERY_ENV = "PROTLOC_STATUS_EVERY"
DEFAULT_EVERY_S = 30.0


class StatusLine:
    """Counts steps of a loop of `total` steps (starting after `initial`) and prints a status line when due."""

    def __init__(self, total: int, initial: int = 0, what: str = "step", every: float | None = None):
        self.total, self.step, self.what = total, initial, what
        self.every = float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S)) if every is None else every
        self.start = self.last = time.monotonic()
        self.first_step, self.lines, self.images = initial, 0, 0

    def update(self, loss: float, images: int) -> None:
        """One more step, of `images` images, that ended with `loss`."""
        self.step += 1
        self.images += images
        now = time.monotonic()
        if self.lines and now - self.last < self.every:
            return
        rate = self.images / max(now - self.last, 1e-9)
        eta = (self.total - self.step) * (now - self.start) / (self.step - self.first_step)
        click.echo(f"protloc: {self.what} {self.step}/{self.total}, loss {loss:.4f}, {rate:.1f} img/s, "
                   f"ETA {datetime.timedelta(seconds=round(eta))}", err=True)
        self.last, self.images, self.lines = now, 0, self.lines + 1


def status_line(ctx, total: int, initial: int = 0, what: str = "step") -> StatusLine | None:
    """A StatusLine when stderr is no terminal (and not --quiet), else None."""
    if ctx.meta.get("protloc.quiet") or sys.stderr.isatty():
        return None
    return StatusLine(total, initial, what)
