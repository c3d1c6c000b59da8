"""Decoded images kept in memory across a training run's epochs, when the whole set fits.

Pretraining visits every image once per epoch and cuts new random crops each time, so the same
file would be decoded (and normalized: percentiles, channel selection) hundreds of times. With
few, large fields that dominates a step: `make demo`'s recipe on the 82 fields of 820 x 820 of
hpa_dictionary spent most of each step decoding (README, Speed). An image's Item (its pixels as
the file holds them, uint8/uint16, and its scale/shift) depends only on the file and the view
options, so keeping it gives exactly the crops decoding it again would.
"""

from __future__ import annotations

import collections
import logging
import os

from protloc.data import Item, ViewOptions, index_batches
from protloc.sources import Source

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.25  # of the machine's physical memory, split over a node's processes: what decoded images may take


def memory_budget(processes: int = 1) -> int:
    """Bytes of decoded images one of `processes` training processes may keep (0 where the
    machine's memory is unknown: nothing is kept)."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return 0
    return int(MEMORY_SHARE * physical / max(processes, 1))


class KeptImages:
    """Items of index batches: decoded by the loader the first time an image is met, then served
    from memory, when the whole set fits in `budget` bytes (estimated from the first batch's
    images: their mean size, with a float32 copy, times the number of images). Otherwise every
    batch is decoded, as index_batches does."""

    def __init__(self, sources: list[Source], opts: ViewOptions, workers: int, budget: int):
        self.sources, self.opts, self.workers, self.budget = sources, opts, workers, budget
        self.items: dict[int, Item] = {}
        self.keep: bool | None = None  # decided on the first batch

    def batches(self, index_lists):
        """Like protloc.data.index_batches(sources, opts, index_lists, workers)."""
        plans = collections.deque()  # (indices, the ones sent to the loader) per batch, in the loader's order

        def to_decode():
            for indices in index_lists:
                # the loader reads ahead: an image asked for again before its first batch is consumed
                # (only at an epoch's turn) is decoded twice, never missed
                need = [i for i in indices if i not in self.items]
                plans.append((indices, need))
                yield need
        for decoded in index_batches(self.sources, self.opts, to_decode(), self.workers):
            indices, need = plans.popleft()
            fresh = dict(zip(need, decoded))
            if self.keep is None and fresh:
                self.keep = self._fits(list(fresh.values()))
            if self.keep:
                self.items.update(fresh)
            yield [fresh[i] if i in fresh else self.items[i] for i in indices]

    def _fits(self, items: list[Item]) -> bool:
        # the pixels as decoded and a float32 copy of them (the trainer's, on a CPU: protloc.pretrain)
        decoded = [item.pixels for item in items if item.pixels is not None]
        per_image = sum(p.nbytes + 4 * p.size for p in decoded) / len(items)
        total = per_image * len(self.sources)
        fits = total <= self.budget
        log.info("decoded images: about %.0f MiB for the %d image(s); %s", total / 2**20, len(self.sources),
                 "kept in memory" if fits else f"decoded every epoch (more than {self.budget / 2**20:.0f} MiB)")
        return fits
