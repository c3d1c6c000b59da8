"""Joining the parts of one embedding run split by `protloc embed --shard I/N` into one file.

Each part of a sharded run (a Slurm array task, a job on another machine: no process group shared)
embeds the I-th of N contiguous slices of the input list, and its meta records `shard`: I, N, the
number of inputs and a digest of the whole input list (protloc.sources.inputs_digest). A merge
takes the parts in any order, checks that they are one run (the same inputs, model, view, protloc
version and working directory: everything the meta says but the part's own rows and skipped
images) and that every slice 1..N is there exactly once, and joins them in slice order, which is
the input order. The per-row columns (protloc.row_meta: where each tile or cell lies, the inputs'
own columns) are joined in the same order; a column some parts lack (an input column none of their
images carries) is empty for their rows, as within one run.
"""

from __future__ import annotations

from protloc.embeddings import Embeddings
from protloc.errors import ProtlocError

PER_PART = ("shard", "skipped")  # what the meta of the parts of one run may differ in


def run_settings(meta: dict) -> dict:
    """What identifies a part's run: its meta less what belongs to the part (the channel plans met are
    the union of the parts')."""
    settings = {k: v for k, v in meta.items() if k not in PER_PART}
    if isinstance(settings.get("channel_strategy"), dict):
        settings["channel_strategy"] = {k: v for k, v in settings["channel_strategy"].items() if k != "plans"}
    shard = meta.get("shard") or {}
    return {**settings, "inputs": shard.get("inputs"), "inputs_digest": shard.get("inputs_digest"),
            "parts": shard.get("count")}


def check_parts(parts: list[Embeddings]) -> list[Embeddings]:
    """The parts in slice order, after checking they are the whole of one sharded run. Raises
    ProtlocError naming the file: a part without shard meta (not written with --shard, or an .npy),
    parts of another run (naming the settings that differ), missing or repeated slices, rows of
    another width, or an id in two parts."""
    for part in parts:
        shard = part.meta.get("shard")
        if not isinstance(shard, dict) or not {"index", "count", "inputs_digest"} <= set(shard):
            raise ProtlocError(f"{part.source}: not a part of a sharded run (written by protloc embed --shard I/N "
                               "to .npz)")
    first = parts[0]
    reference = run_settings(first.meta)
    for part in parts[1:]:
        settings = run_settings(part.meta)
        differ = sorted(k for k in {*reference, *settings} if reference.get(k) != settings.get(k))
        if differ:
            raise ProtlocError(f"{part.source}: a part of another run than {first.source} (differs in "
                               f"{', '.join(differ)})")
        if part.x.shape[1] != first.x.shape[1]:
            raise ProtlocError(f"{part.source}: rows of width {part.x.shape[1]}, {first.source}: "
                               f"{first.x.shape[1]}")
    count = reference["parts"]
    by_index: dict[int, Embeddings] = {}
    for part in parts:
        index = part.meta["shard"]["index"]
        if index in by_index:
            raise ProtlocError(f"{part.source}: part {index}/{count} given twice (also {by_index[index].source})")
        by_index[index] = part
    missing = [str(i) for i in range(1, count + 1) if i not in by_index]
    if missing:
        raise ProtlocError(f"{first.source}: part(s) {', '.join(missing)} of {count} missing")
    ordered = [by_index[i] for i in range(1, count + 1)]
    seen: dict[str, str] = {}
    for part in ordered:
        for id_ in part.ids:
            if seen.setdefault(id_, part.source) != part.source:
                raise ProtlocError(f"{part.source}: row {id_} is also in {seen[id_]}")
    return ordered


def merged_meta(ordered: list[Embeddings]) -> dict:
    """The meta of the joined file: the run's, with the parts' skipped images joined in order, the
    channel plans united, and no shard."""
    meta = {k: v for k, v in ordered[0].meta.items() if k != "shard"}
    meta["skipped"] = [s for part in ordered for s in part.meta.get("skipped", [])]
    if isinstance(meta.get("channel_strategy"), dict):
        plans = {p for part in ordered for p in part.meta["channel_strategy"].get("plans", [])}
        meta["channel_strategy"] = {**meta["channel_strategy"], "plans": sorted(plans)}
    return meta


def merged_obs(ordered: list[Embeddings]) -> dict[str, list]:
    """The parts' per-row columns joined in order; a column a part lacks is empty ("") for its rows."""
    names = list(dict.fromkeys(name for part in ordered for name in (part.obs or {})))
    return {name: [v for part in ordered for v in (part.obs or {}).get(name, [""] * len(part.ids))]
            for name in names}
