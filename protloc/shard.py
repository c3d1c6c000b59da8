"""Sharded embedding under torchrun: each rank embeds a contiguous slice of the inputs, rank 0
writes every row in input order.

    torchrun --nproc-per-node 8 -m protloc -- embed plates/ --weights dino.pt -o emb.npz

Rank r of R takes inputs [r*n/R, (r+1)*n/R): contiguous slices, so input order is rank order and
rank 0 only has to append each rank's rows after its own. Rows travel to rank 0 through the
process group (gloo on CPU, NCCL on GPUs) in chunks of at most CHUNK_ROWS rows, so no rank
holds more than one chunk beyond its own rows (which stay on disk, in a RowWriter), and no
shared filesystem is needed between nodes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from protloc.distributed import World
from protloc.embeddings import RowWriter
from protloc.errors import ProtlocError

CHUNK_ROWS = 4096


def part_slice(n: int, index: int, count: int) -> slice:
    """Part `index` (0-based) of `count` contiguous parts of n inputs, sizes differing by at most one."""
    return slice(index * n // count, (index + 1) * n // count)


def my_slice(n: int, world: World) -> slice:
    """The contiguous share of n inputs that this rank embeds."""
    return part_slice(n, world.rank, world.size)


def gather_to_main(world: World, writer: RowWriter | None, info: dict) -> tuple[RowWriter | None, list[dict]]:
    """Bring every rank's rows and bookkeeping (`info`: ids, skipped images, ...; picklable) to
    rank 0, in rank order.

    Returns (a writer holding all rows, or None when no rank embedded anything; every rank's
    info) on rank 0, and (None, []) elsewhere. Every rank must call it."""
    if world.size == 1:
        return writer, [info]
    shapes = [None] * world.size  # (rows, width) of every rank's writer
    dist.all_gather_object(shapes, (writer.rows, writer.dim) if writer is not None else (0, 0))
    rows = [n for n, _ in shapes]
    dims = {d for _, d in shapes if d}
    if len(dims) > 1:
        raise ProtlocError(f"ranks made rows of different widths {sorted(dims)}: the images differ in channels "
                           "(--channel-strategy per-channel)")
    dim = dims.pop() if dims else 0
    infos = [None] * world.size if world.is_main else None
    dist.gather_object(info, infos, dst=0)
    if not world.is_main:
        if writer is not None and writer.rows:
            mine = writer.array()  # (rows, dim) memory map: read a chunk at a time
            for start in range(0, writer.rows, CHUNK_ROWS):
                dist.send(torch.from_numpy(mine[start:start + CHUNK_ROWS].copy()).to(world.device), dst=0)
        return None, []
    if dim and writer is None:
        writer = RowWriter(dim)
    for rank in range(1, world.size):
        remaining = rows[rank]
        while remaining:
            n = min(CHUNK_ROWS, remaining)
            chunk = torch.empty(n, dim, dtype=torch.float32, device=world.device)
            dist.recv(chunk, src=rank)
            writer.append(chunk.cpu().numpy())
            remaining -= n
    return writer, infos
