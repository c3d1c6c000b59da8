"""Which dimension of a TIFF's array is what: Y, X, channels, Z, or an axis protloc refuses.

Axis letters are trusted only when real metadata gave them: OME, ImageJ hyperstacks,
Micro-Manager, tifffile's shaped JSON with an "axes" key, and the other formats tifffile parses
with real axes. TIFF samples 'S' (RGB, extra samples) are structural and always channels.
tifffile's own 'Q' / 'I' letters, and the page 'YX' of plain and shaped-without-axes files, are
guesses: a (32, 40, 5) channels-last array stored as 32 pages of 40 x 5 pixels comes back as
'QYX'. Then the shape rule decides (`shape_rule`), and `--axes` overrides everything.
"""

from __future__ import annotations

import tifffile
from tifffile.tifffile import shaped_description_metadata  # not re-exported at the top level

from protloc.errors import ProtlocError

# tifffile axis letters -> what protloc does with them; other letters are resolved from the shape
_ROLES = {"C": "C", "S": "C", "Z": "Z", "T": "T", "Y": "Y", "X": "X"}
_AXES_LETTERS = set("CSZTYXQI")  # what --axes may name
# axes of several places in one file, never merged into one image
_POSITIONS = {"R": "stage positions", "M": "mosaic tiles", "J": "tile columns", "K": "tile rows"}
SMALL = 4  # a dimension is small next to Y and X when SMALL times it fits in both


def trusted(series: tifffile.TiffPageSeries) -> bool:
    """Whether tifffile's axis letters for `series` come from real metadata."""
    if series.kind in ("generic", "uniform"):
        return False
    if series.kind == "shaped":
        try:
            return "axes" in shaped_description_metadata(series.keyframe.shaped_description or "")
        except ValueError:
            return False
    return True


def layout(path: str, shape: tuple[int, ...], letters: str, from_metadata: bool = True,
           explicit: bool = False) -> list[str]:
    """One role per dimension of `shape`: 'Y', 'X', 'C', 'Z', or '1' (size 1, squeezed away).

    `letters` are tifffile's (or, `explicit`, the user's --axes); unless `from_metadata` (see
    `trusted`), only their samples 'S' count. Raises ProtlocError naming the file for more than
    one time point or position, for --axes that do not fit, and for a shape the rule cannot decide."""
    if explicit:
        bad = sorted(set(letters) - _AXES_LETTERS)
        if bad or len(letters) != len(shape):
            why = f"unknown letter(s) {''.join(bad)}" if bad else f"the image has {len(shape)} dimensions {shape}"
            raise ProtlocError(f"{path}: --axes {letters} does not fit: {why}")
    elif len(letters or "") != len(shape):
        letters, from_metadata = "Q" * len(shape), False
    if not (from_metadata or explicit):
        letters = "".join(a if a == "S" else "Q" for a in letters)
    roles = [_ROLES.get(a, "?") for a in letters]
    for i, (n, a) in enumerate(zip(shape, letters)):
        if roles[i] == "T" and n > 1:
            raise time_points(path, n)
        if a in _POSITIONS and n > 1:
            raise positions(path, n, f"{_POSITIONS[a]} (axis {a} of its metadata)")
        if n == 1 and roles[i] not in "YX":
            roles[i] = "1"
    unknown = [i for i, r in enumerate(roles) if r == "?"]
    named_ok = roles.count("Y") == 1 and roles.count("X") == 1 and roles.count("Z") <= 1
    if explicit and not named_ok:
        raise ProtlocError(f"{path}: --axes {letters} must name Y and X once and Z at most once")
    if named_ok and len(unknown) <= 1:
        if not unknown:
            return roles
        # one unknown axis next to named ones ('QYX', 'ZQYX'): it is whichever of C, Z is missing
        for missing in "CZ":
            if missing not in roles:
                roles[unknown[0]] = missing
                return roles
    return shape_rule(path, shape, samples=[i for i, a in enumerate(letters) if a == "S" and shape[i] > 1])


def shape_rule(path: str, shape: tuple[int, ...], samples: list[int] = ()) -> list[str]:
    """Axes from the shape alone (dimensions of size 1 aside; `samples` are channels already).

    Y, X are the one adjacent pair of dimensions such that every other dimension is small next
    to them (4 x n <= min(Y, X)); none, or several, is an error asking for --axes. Then one other
    dimension is C (before or after Y, X: CYX, YXC, any number of channels; Z when samples are
    the channels), two before Y, X are CZ when the first is <= 4 < the second, else ZC, and one
    before and one after is ZYXC; anything else asks for --axes."""
    roles = ["C" if i in samples else "1" for i in range(len(shape))]
    free = [i for i, n in enumerate(shape) if n != 1 and i not in samples]
    if len(free) < 2:  # a 1-pixel-wide image: its last two dimensions are Y, X
        free = [i for i in range(len(shape)) if i not in samples][-2:]
    pairs = [(y, x) for y, x in zip(free, free[1:])
             if all(SMALL * shape[i] <= min(shape[y], shape[x]) for i in free if i not in (y, x))]
    if len(pairs) != 1:
        raise _ask_for_axes(path, shape)
    y, x = pairs[0]
    before, after = [i for i in free if i < y], [i for i in free if i > x]
    if len(before) + len(after) == 1:
        named = {(before + after)[0]: "Z" if samples else "C"}
    elif len(before) == 2 and not after and not samples:
        first, second = before
        named = {first: "C", second: "Z"} if shape[first] <= 4 < shape[second] else {first: "Z", second: "C"}
    elif len(before) == 1 and len(after) == 1 and not samples:
        named = {before[0]: "Z", after[0]: "C"}
    elif not before and not after:
        named = {}
    else:
        raise _ask_for_axes(path, shape)
    for i, r in {**named, y: "Y", x: "X"}.items():
        roles[i] = r
    return roles


def time_points(path: str, n: int) -> ProtlocError:
    return ProtlocError(f"{path}: has {n} time points; protloc reads one time point per file")


def positions(path: str, n: int, what: str) -> ProtlocError:
    return ProtlocError(f"{path}: holds {n} {what}; protloc reads one position per file")


def _ask_for_axes(path, shape):
    return ProtlocError(f"{path}: cannot tell the axes of shape {tuple(shape)} (no axes metadata, and the shape "
                        "does not decide; see --axes in --help); name them with --axes, e.g. --axes CYX or YXC")
