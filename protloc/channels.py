"""Channel names: the shared vocabulary, aliases, and selecting channels of an image by name.

Microscopy channels are identified by what they show, not by their position in the file: an
HPA image stores nucleus/protein/microtubules/ER as `_blue/_green/_red/_yellow` files, OpenCell
stores Hoechst then mNeonGreen pages, a yeast screen stores `_gfp/_rfp` files. protloc maps all
of those to one vocabulary of canonical names, so a model trained on one layout can be fed
another by name (the `channel` token layout embeds each channel with the embedding of its name).
"""

from __future__ import annotations

from protloc.errors import ProtlocError

# Canonical names known to every model; a `channel`-layout model stores its own vocabulary,
# which starts with these, so new names can be appended without shifting the ids of old ones.
VOCABULARY = ("nucleus", "protein", "microtubules", "er", "cytosol", "actin", "mitochondria", "membrane")

# Common names for the same stains or file suffixes -> canonical name.
ALIASES = {
    "dna": "nucleus", "dapi": "nucleus", "hoechst": "nucleus", "blue": "nucleus", "nuclei": "nucleus",
    "gfp": "protein", "green": "protein", "mneongreen": "protein", "target": "protein", "poi": "protein",
    "red": "microtubules", "tubulin": "microtubules", "microtubule": "microtubules",
    "yellow": "er", "endoplasmic_reticulum": "er", "calreticulin": "er",
    "rfp": "cytosol", "cytoplasm": "cytosol",
    "phalloidin": "actin", "mito": "mitochondria", "mitotracker": "mitochondria",
    "wga": "membrane",
}


def canonical(name: str) -> str:
    """The canonical form of a channel name: lower case, aliases resolved; unknown names kept."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    return ALIASES.get(key, key)


def parse_names(text: str | None) -> list[str] | None:
    """`"nucleus, protein"` -> `["nucleus", "protein"]` (canonical); None or "" -> None."""
    if not text:
        return None
    names = [canonical(part) for part in text.split(",") if part.strip()]
    if len(set(names)) != len(names):
        raise ProtlocError(f"channel names repeat: {text!r}")
    return names


def select_channels(n_channels: int, file_names: list[str] | None, wanted: list[str] | None,
                    source: str) -> tuple[list[int], list[str]]:
    """Which channels of an image to keep, in which order, and their names.

    - `wanted` is None: keep all, named as in the file (or `ch0, ch1, ...` when unnamed).
    - the file has names and every wanted name is among them: select and reorder by name.
    - otherwise, as many wanted names as channels: they name the channels in file order.
    Returns (indices into the file's channels, canonical names of the kept channels).
    """
    names = [canonical(n) for n in file_names] if file_names else None
    if wanted is None:
        return list(range(n_channels)), names or [f"ch{i}" for i in range(n_channels)]
    if names and all(w in names for w in wanted):
        return [names.index(w) for w in wanted], list(wanted)
    if len(wanted) == n_channels:
        return list(range(n_channels)), list(wanted)
    have = f" ({', '.join(names)})" if names else ""
    raise ProtlocError(f"{source}: has {n_channels} channel(s){have}, but --channels asks for "
                       f"{len(wanted)} ({', '.join(wanted)})")
