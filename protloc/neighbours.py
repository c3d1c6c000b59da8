"""The k nearest training rows of each query by cosine similarity: exact, or approximate (faiss).

Both backends answer the same question and return the same thing: per query, the k most similar
usable training rows, most similar first, as (similarity, row) pairs. protloc.knn votes on these
alone, so both backends are scored by one vote.

exact (the default): a blocked search. One matrix product gives the similarities of Q_BLOCK
queries to T_BLOCK training rows (4,096 x 8,192 float32, 128 MB, one buffer reused); each block
keeps its best k per query, and a query block's k x (training blocks) candidates are ranked once
at the end. Memory is O(Q_BLOCK x T_BLOCK + Q_BLOCK x k x training blocks + queries x k), however
many training rows there are, and no normalized copy of them is made: each training block is
normalized as it is used (1 / (2 Q_BLOCK) of the product's arithmetic). The result does not depend
on the block sizes: equal similarities are ordered by training row, the lower row first (so it is
the one kept at the k-th place). Before blocking, ties went whichever way torch.topk left them,
which changed with the number of training rows.

faiss (`pip install protloc[faiss]`): an inverted-file index (IndexIVFFlat, inner product of
L2-normalized rows = cosine) with sqrt(training rows) lists, its k-means trained on a fixed
sample (seeded) and searched in `nprobe` lists per query (Johnson, Douze & Jegou 2019,
"Billion-scale similarity search with GPUs"). Approximate: a neighbour in a list that was not
probed is missed. Fewer, larger lists than the faiss wiki's 4-16 sqrt(n): here the queries are a
fifth of the rows, not a stream, so building the index (k-means, assigning every row) weighs as
much as searching it. Measured on 100,000 rows (80,000 indexed, 20 noisy clusters): sqrt(n) lists
with nprobe 16 found 0.996 of the 20 exact neighbours in 15 s a fold, 4 sqrt(n) lists with nprobe
32 found 0.891 in 31 s (most of it k-means over 4x the lists and 4x the sample). faiss cannot
leave out a query's own rows (leave-one-out's exclusion; searching k + the largest group and
dropping them would make the cost grow with the largest group), so `exclude` with it is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from protloc.errors import ProtlocError

INDEXES = ("exact", "faiss")
Q_BLOCK, T_BLOCK = 4096, 8192  # queries x training rows per similarity block (128 MB): measured, README "k-NN at scale"
NPROBE = 16                    # faiss lists searched per query
NLIST_PER_SQRT = 1             # faiss lists = sqrt(training rows): measured, README "k-NN at scale"
KMEANS_SAMPLE = 64             # training rows per list that faiss's k-means sees (it warns below 39)


@dataclass(frozen=True)
class Search:
    """How the k nearest rows are found: `index` one of INDEXES; `nprobe` and `seed` for faiss."""
    index: str = "exact"
    nprobe: int = NPROBE
    seed: int = 0

    def __post_init__(self):
        if self.index not in INDEXES:
            raise ProtlocError(f"unknown k-NN index {self.index!r}: expected one of {', '.join(INDEXES)}")
        if self.nprobe < 1:
            raise ProtlocError(f"nprobe must be at least 1, got {self.nprobe}")
        if self.index == "faiss":
            faiss_module()  # a missing extra is said before any embeddings are read

    def record(self) -> dict:
        """What a result file says about the search."""
        if self.index == "exact":
            return {"index": "exact"}
        return {"index": "faiss IndexIVFFlat, inner product of L2-normalized rows",
                "nlist": f"round({NLIST_PER_SQRT} sqrt(training rows)), at most training rows / {KMEANS_SAMPLE}",
                "nprobe": self.nprobe, "seed": self.seed, "faiss": faiss_module().__version__}


def nearest(train_x, query_x, k: int, exclude=None, search: Search = Search(), device="cpu",
            q_block: int = Q_BLOCK, t_block: int = T_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar training rows of each query.

    train_x: (n_train, D), query_x: (n_query, D), any real dtype (computed in float32; rows are
    L2-normalized here, a zero row has similarity 0 to everything). k <= n_train.
    exclude: training rows a query may not use, a boolean (n_query, n_train) array or a callable
    `exclude(queries, train)` of two slices returning the (queries, train) block of that mask.
    Returns (similarity, row), both (n_query, k) on `device`: float32 cosines, most similar first,
    and int64 training rows. Where a query has fewer than k usable rows, the places after them
    hold similarity -inf (their rows are meaningless). Raises ProtlocError for k outside
    1..n_train, and when faiss is asked for but not installed, or asked to exclude rows.
    """
    if not 1 <= k <= len(train_x):
        raise ProtlocError(f"k = {k} neighbours asked of {len(train_x)} training rows")
    if len(query_x) == 0:
        return torch.empty((0, k), device=device), torch.empty((0, k), dtype=torch.int64, device=device)
    if search.index == "faiss":
        if exclude is not None:
            raise ProtlocError("the faiss index cannot leave a query's own rows out (leave-one-out): "
                               "use the exact index")
        return _faiss(train_x, query_x, k, search, device)
    return _exact(train_x, query_x, k, exclude, device, q_block, t_block)


def _unit(x, device) -> torch.Tensor:
    """Rows of x as float32 unit vectors on device (a new tensor; x is not changed)."""
    return F.normalize(torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device), dim=1)


def _exact(train_x, query_x, k, exclude, device, q_block, t_block):
    n_train, n_query = len(train_x), len(query_x)
    best_sim = torch.empty((n_query, k), dtype=torch.float32, device=device)
    best_row = torch.empty((n_query, k), dtype=torch.int64, device=device)
    # one buffer for every similarity block: a fresh 32-128 MB tensor per block costs the kernel's
    # page faults each time (measured: the product took 40% longer)
    buffer = torch.empty(min(q_block, n_query) * min(t_block, n_train), dtype=torch.float32, device=device)
    for q0 in range(0, n_query, q_block):
        q1 = min(q0 + q_block, n_query)
        query = _unit(query_x[q0:q1], device)                                # (q, D)
        sims, rows = [], []  # each training block's best k, by row: (q, k) per block
        for t0 in range(0, n_train, t_block):
            t1 = min(t0 + t_block, n_train)
            sim = buffer[:(q1 - q0) * (t1 - t0)].view(q1 - q0, t1 - t0)
            torch.mm(query, _unit(train_x[t0:t1], device).T, out=sim)          # (q, t)
            if exclude is not None:
                mask = exclude(slice(q0, q1), slice(t0, t1)) if callable(exclude) else exclude[q0:q1, t0:t1]
                mask = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask, dtype=bool))
                sim.masked_fill_(mask.to(device=device, dtype=torch.bool), float("-inf"))
            s, r = _best(sim, k)
            sims.append(s)
            rows.append(r + t0)
        # the candidates lie in row order (blocks in order, each block's by row), so ranking them
        # by (similarity, place) ranks them by (similarity, row)
        candidates, candidate_rows = torch.cat(sims, 1), torch.cat(rows, 1)  # (q, k x blocks)
        s, place = _best(candidates, k)
        s, order = s.sort(dim=1, descending=True, stable=True)              # most similar first, ties by row
        best_sim[q0:q1] = s
        best_row[q0:q1] = candidate_rows.gather(1, place.gather(1, order))
    return best_sim, best_row


def _best(sim, k):
    """Each row's k best entries of sim (q, t) by (value descending, column ascending), in column order:
    (values, columns), both (rows, min(k, columns)).

    torch.topk keeps an arbitrary one of entries tied at the k-th place; it is asked for k + 1, and
    where the k-th and (k+1)-th values are equal (ties at the boundary, rare but real: duplicate
    images) that row is sorted whole, stably, instead."""
    n = sim.shape[1]
    if n <= k:
        return sim.clone(), torch.arange(n, device=sim.device).expand_as(sim)  # sim is the reused buffer
    values, columns = sim.topk(k + 1, dim=1)                                 # sorted, largest first
    tied = (values[:, k - 1] == values[:, k]) & (values[:, k - 1] > float("-inf"))
    values, columns = values[:, :k], columns[:, :k]
    if tied.any():
        values, columns = values.clone(), columns.clone()
        rows = tied.nonzero().flatten()
        v, c = sim[rows].sort(dim=1, descending=True, stable=True)
        values[rows], columns[rows] = v[:, :k], c[:, :k]
    columns, order = columns.sort(dim=1)
    return values.gather(1, order), columns


def faiss_module():
    """The faiss module; ProtlocError naming the extra when it is not installed."""
    try:
        import faiss
    except ImportError:
        raise ProtlocError("--index faiss needs faiss: pip install 'protloc[faiss]' (or faiss-cpu)") from None
    return faiss


def nlist(n_train: int) -> int:
    """faiss lists for n_train rows: NLIST_PER_SQRT sqrt(n), at most n / KMEANS_SAMPLE (at least 1)."""
    return max(1, min(round(NLIST_PER_SQRT * math.sqrt(n_train)), n_train // KMEANS_SAMPLE))


def _faiss(train_x, query_x, k, search, device):
    return faiss_search(faiss_index(train_x, search), query_x, k, search.nprobe, device)


def faiss_index(train_x, search: Search):
    """A faiss IndexIVFFlat of the L2-normalized training rows (n_train, D): nlist(n_train) lists,
    k-means on a sample of KMEANS_SAMPLE rows per list drawn with search.seed (faiss's own seed
    too), then the rows (the index holds its own float32 copy of them: 4 D bytes a row)."""
    faiss = faiss_module()
    n_train, dim = len(train_x), np.asarray(train_x[:1]).shape[1]
    lists = nlist(n_train)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = search.seed
    rng = np.random.default_rng(search.seed)
    sample = np.sort(rng.choice(n_train, min(n_train, KMEANS_SAMPLE * lists), replace=False))
    index.train(_unit(np.asarray(train_x)[sample], "cpu").numpy())
    # in 4 parts: a list is a std::vector, which grows by doubling; added in many small parts a list
    # can end with up to twice the memory it holds, in 4 about equal parts (n, 2n, 4n) near it
    part = -(-n_train // 4)
    for t0 in range(0, n_train, part):
        index.add(_unit(train_x[t0:t0 + part], "cpu").numpy())
    return index


def faiss_search(index, query_x, k: int, nprobe: int = NPROBE, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows in a faiss_index of each query (n_query, D), searching `nprobe` of its
    lists: (similarity, row) as `nearest` returns them."""
    index.nprobe = min(nprobe, index.nlist)
    sims, rows = [], []
    for q0 in range(0, len(query_x), T_BLOCK):
        s, r = index.search(_unit(query_x[q0:q0 + T_BLOCK], "cpu").numpy(), k)  # (q, k) each
        s[r < 0] = -np.inf   # fewer than k rows in the probed lists
        sims.append(torch.from_numpy(s))
        rows.append(torch.from_numpy(r).clamp_min(0))
    return torch.cat(sims).to(device), torch.cat(rows).to(device)
