"""Resumable embedding: rows committed chunk by chunk, each durable before it counts.

`protloc embed DATA -o OUT --resume` keeps a work folder `OUT.protloc-work/` beside OUT:

    run.json               what the run is: a digest of its inputs, the model, the view, the batch
                           size, the device kind, the chunk size; a resumed run must match it
    chunk-00000042.npz     the rows of sources [42 C, 43 C) (C = chunk_images): rows (n, D) float32,
                           ids, and the bookkeeping of those images (skipped ones, tile or cell meta)

Chunk k is written to a temporary name, flushed to disk and renamed (protloc.output.atomic_path) only
after every image of it is embedded, so after a SIGKILL at any moment each chunk file present is whole;
a run started again with `--resume` checks run.json and continues at the first missing chunk. Batches
never span a chunk boundary (protloc.data.batches' `chunk_images`), so the continued run makes exactly
the batches an uninterrupted run makes, hence the same rows bit for bit. Chunks hold the tile or cell
rows; `--aggregate mean` is applied when the chunks are read back in order, as a run that never
stopped applies it. When the output is written the work folder is removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from protloc.embed import EmbedStats, embed
from protloc.errors import ProtlocError
from protloc.ids import image_of
from protloc.output import atomic_path
from protloc.sources import Source
from protloc.tiles import mean_per_image

CHUNK_IMAGES = 1024  # a kill loses at most this many images' work; a chunk costs one small file write
RUN_FILE = "run.json"


def work_folder(output: str) -> str:
    """The work folder of output file `output`: beside it, named after it."""
    return f"{output}.protloc-work"


class ChunkStore:
    """The committed chunks of one run, in `folder`, and what the run is (`fingerprint`: a dict of
    named, JSON-able parts, e.g. inputs, model, view)."""

    def __init__(self, folder: str, fingerprint: dict, n_sources: int, resume: bool, force: bool = False,
                 chunk_images: int = CHUNK_IMAGES):
        """Start a run in `folder`, or with `resume` continue the one there. Raises ProtlocError when
        a folder left by an interrupted run is met without --resume (or --force, which starts afresh),
        or when `fingerprint` differs from the recorded run's (naming each part that differs)."""
        self.folder, self.n_sources = folder, n_sources
        run = {"fingerprint": fingerprint, "chunk_images": chunk_images, "sources": n_sources}
        recorded = self._recorded() if os.path.isdir(folder) else None
        if recorded is not None and not resume and not force:
            raise ProtlocError(f"{folder}: holds an interrupted run of this output; continue it with --resume, or "
                               "start afresh with --force")
        if recorded is not None and resume:
            changed = [name for name in sorted({*recorded["fingerprint"], *fingerprint})
                       if recorded["fingerprint"].get(name) != fingerprint.get(name)]
            if recorded.get("chunk_images") != chunk_images:
                changed.append("chunk size")
            if changed:
                raise ProtlocError(f"{folder}: --resume continues the run recorded there, and its "
                                   f"{', '.join(changed)} differ(s) from this one's; rerun as it was, or start "
                                   "afresh with --force")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            with atomic_path(os.path.join(folder, RUN_FILE)) as tmp, open(tmp, "w") as f:
                json.dump(run, f)
        self.chunk_images = chunk_images
        self.chunks = -(-n_sources // chunk_images)  # ceil
        self.done = 0  # chunks committed: a prefix; anything after a gap is redone
        while self.done < self.chunks and os.path.exists(self._path(self.done)):
            self.done += 1

    def _recorded(self) -> dict | None:
        try:
            with open(os.path.join(self.folder, RUN_FILE)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # killed before run.json was whole: nothing was committed

    def _path(self, k: int) -> str:
        return os.path.join(self.folder, f"chunk-{k:08d}.npz")

    @property
    def start(self) -> int:
        """The first source not yet embedded."""
        return min(self.done * self.chunk_images, self.n_sources)

    def commit(self, k: int, ids: list[str], rows: list[np.ndarray], record: dict) -> None:
        """Make chunk k durable: its rows in order, their ids, and `record` (JSON-able bookkeeping)."""
        assert k == self.done, (k, self.done)
        x = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        with atomic_path(self._path(k)) as tmp, open(tmp, "wb") as f:
            np.savez(f, rows=x, ids=np.array(ids, dtype=str), record=np.array(json.dumps(record)))
        self.done += 1

    def read(self, k: int) -> tuple[list[str], np.ndarray, dict]:
        try:
            with np.load(self._path(k), allow_pickle=False) as data:
                return [str(i) for i in data["ids"]], data["rows"], json.loads(str(data["record"]))
        except (OSError, ValueError, KeyError) as e:
            raise ProtlocError(f"{self._path(k)}: unreadable chunk of an interrupted run ({e}); start afresh "
                               "with --force") from None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def embed_resumable(store: ChunkStore, model, sources: list[Source], opts, stats: EmbedStats, progress=None,
                    **embed_kw):
    """Yield (ids, vectors) of every source, in input order, as protloc.embed.embed does, embedding only
    the sources after the store's committed chunks and committing each chunk as it completes; the rows
    come from the committed chunks (read back in order), so memory holds one chunk at a time.

    `stats` is filled for the whole run (committed chunks included); `progress(n)` counts images."""
    if progress is not None and store.start:
        progress(store.start)
    _embed_chunks(store, model, sources, dataclasses.replace(opts, aggregate=None), progress, embed_kw)
    rows = _read_back(store, stats, opts.tile is not None or opts.cells is not None)
    return mean_per_image(rows) if opts.aggregate == "mean" else rows


def _embed_chunks(store, model, sources, view_opts, progress, embed_kw):
    """Embed sources[store.start:] and commit every chunk, the last one included."""
    if store.start >= len(sources):
        return
    index = {s.id: i for i, s in enumerate(sources)}
    part = EmbedStats()  # of this process's share: per chunk, the difference of two snapshots
    current, ids, rows, before = store.done, [], [], _snapshot(part)
    after = before  # the snapshot after the latest batch

    def commit_until(k):  # every chunk before chunk k is complete
        nonlocal current, ids, rows, before
        while current < k:
            mine = [s for s in part.skipped if index[image_of(s[0])] // store.chunk_images == current]
            record = {"images": after[0] - before[0], "views": after[1] - before[1],
                      "view_meta": part.view_meta[before[2]:after[2]], "skipped": [list(s) for s in mine],
                      "channel_maps": sorted(part.channel_maps)}
            store.commit(current, ids, rows, record)
            current, ids, rows, before = current + 1, [], [], after

    for batch_ids, vectors in embed(model, sources[store.start:], view_opts, stats=part, progress=progress,
                                    chunk_images=store.chunk_images, **embed_kw):
        k = index[image_of(batch_ids[0])] // store.chunk_images
        # `part` already counts this batch: the chunks before it end at the snapshot after the previous batch
        commit_until(k)
        ids.extend(batch_ids)
        rows.append(vectors)
        after = _snapshot(part)
    commit_until(store.chunks + 1)


def _snapshot(stats: EmbedStats) -> tuple[int, int, int]:
    return stats.images, stats.views, len(stats.view_meta)


def _read_back(store, stats: EmbedStats, views: bool):
    """The committed chunks' rows in order; `stats` summed over them."""
    for k in range(store.chunks):
        ids, rows, record = store.read(k)
        stats.images += record["images"]
        stats.views += record["views"] if views else 0
        stats.view_meta.extend(record["view_meta"])
        stats.skipped.extend(tuple(s) for s in record["skipped"])
        stats.channel_maps.update(record["channel_maps"])
        if len(ids):
            yield ids, rows
