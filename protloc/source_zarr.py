"""OME-Zarr input (NGFF 0.4 and 0.5): images and HCS plates, read with zarr-python.

An OME-Zarr image is a zarr group with `multiscales` metadata (NGFF 0.4: in the group's
attributes; 0.5: under their `ome` key): a list of levels (full resolution first) of one
array each, with named, typed axes (time, channel, space z/y/x). protloc reads one level
(`--zarr-level`, default 0, the full resolution), plane by plane through zarr's slicing (only
the chunks of the plane being read are decoded; one image is in memory at a time), projects z
as for TIFF (max, mean or the middle slice: protloc.tiff.Projection) and names the channels from
the `omero` metadata's channel labels (canonical names and aliases: protloc.channels).

An HCS plate is a group with `plate` metadata: its wells (`B/3`), each a group with `well`
metadata listing its fields (`0`, `1`, ...), each field an OME-Zarr image. Every field of every
well is one image, with id `PLATE/B/3/0` (the plate's path as given) and meta `plate` (the
plate's `name`, else its folder's name), `well` (`B3`), `row` (`B`), `column` (`3`) and `field`
(`0`), wells in the order the plate lists them.

A folder is an OME-Zarr input when its name ends in `.zarr`, or it holds `zarr.json` / `.zattrs`
with multiscales or plate metadata. Refused in one line: a zarr group without either, an NGFF
version other than 0.4/0.5, a missing level, well or field, axes that do not match the array, a
time axis of more than one point, omero channels that do not match the channel axis. `--axes`
and `--series` are TIFF settings: OME-Zarr declares its axes and holds one image per group.
zarr is an optional dependency (`pip install 'protloc[zarr]'`).
"""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np

from protloc.errors import ProtlocError
from protloc.sources import Source
from protloc.tiff import Z_PROJECTIONS, Image, Projection, check_size, convert

log = logging.getLogger(__name__)

__all__ = ["is_input", "found_in_folder", "sources", "read"]

VERSIONS = ("0.4", "0.5")
EXTENSION = ".zarr"
METADATA_FILES = ("zarr.json", ".zattrs")  # zarr v3 (NGFF 0.5) and v2 (NGFF 0.4)
NGFF_KEYS = ("multiscales", "plate", "well")


def is_input(path: str) -> bool:
    """A folder named *.zarr, or one holding zarr metadata with NGFF multiscales, plate (or well,
    to be refused by name) metadata."""
    if not os.path.isdir(path):
        return False
    if found_in_folder(os.path.basename(os.path.normpath(path))):
        return True
    for name in METADATA_FILES:
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                attrs = json.load(f)
        except (OSError, ValueError):
            continue
        attrs = attrs.get("attributes", {}) if name == "zarr.json" else attrs
        attrs = attrs.get("ome", attrs) if isinstance(attrs, dict) else {}
        if isinstance(attrs, dict) and any(key in attrs for key in NGFF_KEYS):
            return True
    return False


def found_in_folder(name: str) -> bool:
    """A folder name a folder search takes as an OME-Zarr input (not searched inside)."""
    return name.lower().endswith(EXTENSION)


def sources(path: str) -> list[Source]:
    """The images of an OME-Zarr input: the image itself, or every field of every well of a plate."""
    meta = _ngff(_open(path), path)
    if "plate" in meta:
        return _fields(path, meta["plate"])
    if "multiscales" in meta:
        return [Source(path, (path,), None)]
    what = "an HCS well (give its plate)" if "well" in meta else "neither an image (multiscales) nor a plate"
    raise ProtlocError(f"{path}: not an OME-Zarr image or plate: its metadata describe {what}")


def read(path: str, z: str = "max", axes: str | None = None, max_pixels: int | None = None,
         series: int | None = None, level: int = 0) -> Image:
    """Level `level` of the OME-Zarr image at `path` as a (C, Y, X) image, z projected with `z`,
    channel names from omero metadata (raw; None without them). Raises ProtlocError naming the
    image for anything it does not hold as its metadata declare (see the module doc)."""
    if z not in Z_PROJECTIONS:
        raise ProtlocError(f"unknown z projection {z!r} (choose from {', '.join(Z_PROJECTIONS)})")
    if axes is not None:
        raise ProtlocError(f"{path}: an OME-Zarr image declares its axes; --axes applies to TIFFs")
    if series not in (None, 0):
        raise ProtlocError(f"{path}: an OME-Zarr image holds one image; --series applies to TIFFs")
    group = _open(path)
    meta = _ngff(group, path)
    multiscales = meta.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales:
        raise ProtlocError(f"{path}: not an OME-Zarr image (no multiscales metadata)")
    if len(multiscales) > 1:
        log.warning("%s: holds %d multiscale images; read the first", path, len(multiscales))
    datasets = multiscales[0].get("datasets") or []
    if not 0 <= level < len(datasets):
        raise ProtlocError(f"{path}: has {len(datasets)} resolution level(s) (--zarr-level 0 to "
                           f"{len(datasets) - 1}); there is no level {level}")
    where = f"{path}/{datasets[level].get('path')}"
    try:
        array = group[str(datasets[level]["path"])]
    except Exception:  # noqa: BLE001 - a missing key, or a node that is not an array
        raise ProtlocError(f"{where}: level {level} of the multiscales metadata is missing") from None
    if not hasattr(array, "shape"):
        raise ProtlocError(f"{where}: level {level} is a group, not an array")
    roles = _roles(multiscales[0].get("axes"), array.shape, where)
    check_size(where, math.prod(array.shape), max_pixels)
    names = _channel_names(meta.get("omero"), math.prod(n for n, r in zip(array.shape, roles) if r == "C"), path)
    try:
        pixels = convert(_project(array, roles, z), where)
    except ProtlocError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged chunk can make any codec raise anything
        log.debug("reading %s failed", where, exc_info=True)
        raise ProtlocError(f"{where}: not a readable OME-Zarr array ({type(e).__name__}: {e})") from None
    return Image(pixels, names, path)


def _open(path: str):
    """The zarr group at `path` (v2 or v3), opened read-only."""
    try:
        import zarr
    except ImportError:
        raise ProtlocError(f"{path}: reading OME-Zarr needs zarr: pip install 'protloc[zarr]'") from None
    if not os.path.isdir(path):
        raise ProtlocError(f"{path}: no such OME-Zarr folder")
    try:
        return zarr.open_group(path, mode="r")
    except Exception as e:  # noqa: BLE001 - no group, or metadata zarr cannot parse
        raise ProtlocError(f"{path}: not a zarr group ({type(e).__name__}: {e})") from None


def _ngff(group, path: str) -> dict:
    """The NGFF metadata of a group (0.5: under `ome`; 0.4: the attributes), its version checked."""
    attrs = dict(group.attrs)
    meta = attrs.get("ome", attrs)
    if not isinstance(meta, dict):
        raise ProtlocError(f"{path}: its 'ome' attributes are not a JSON object")
    version = meta.get("version")
    for key in NGFF_KEYS:
        if version is None and key in meta:
            node = meta[key][0] if key == "multiscales" and isinstance(meta[key], list) and meta[key] else meta[key]
            version = node.get("version") if isinstance(node, dict) else None
    if not any(k in meta for k in NGFF_KEYS):
        raise ProtlocError(f"{path}: a zarr group without OME-Zarr metadata (no multiscales or plate)")
    if str(version) not in VERSIONS:
        raise ProtlocError(f"{path}: OME-Zarr (NGFF) version {version}; protloc reads {' and '.join(VERSIONS)}")
    return meta


def _roles(axes, shape: tuple[int, ...], where: str) -> str:
    """One role per array dimension from NGFF axes: C (channel), Z, Y, X (space), T (time), 1 (other)."""
    if not isinstance(axes, list) or len(axes) != len(shape):
        n = len(axes) if isinstance(axes, list) else 0
        raise ProtlocError(f"{where}: the multiscales metadata declare {n} axes for an array of shape {shape}")
    roles = ""
    for axis, n in zip(axes, shape):
        name = str(axis.get("name", "")).lower() if isinstance(axis, dict) else str(axis).lower()
        kind = axis.get("type") if isinstance(axis, dict) else None
        role = ("C" if kind == "channel" or name == "c" else "T" if kind == "time" or name == "t"
                else name.upper() if name in ("z", "y", "x") else "1")
        if role in roles:
            raise ProtlocError(f"{where}: two axes of role {role} ({', '.join(str(a) for a in axes)})")
        if role in "T1" and n > 1:
            raise ProtlocError(f"{where}: axis {name!r} holds {n} points; protloc reads images of channel, z, y "
                               "and x axes (others of size 1)")
        roles += role
    if "Y" not in roles or "X" not in roles:
        raise ProtlocError(f"{where}: no y and x axes among {', '.join(map(str, axes))}")
    return roles


def _channel_names(omero, n_channels: int, path: str) -> list[str] | None:
    """The omero channel labels, one per channel; None without them."""
    channels = omero.get("channels") if isinstance(omero, dict) else None
    if not channels:
        return None
    if len(channels) != n_channels:
        raise ProtlocError(f"{path}: its omero metadata name {len(channels)} channel(s), but the image has "
                           f"{n_channels}")
    labels = [c.get("label") if isinstance(c, dict) else None for c in channels]
    return [str(label) for label in labels] if all(labels) else None


def _project(array, roles: str, z: str) -> np.ndarray:
    """(C, Y, X) from the array, one (Y, X) plane at a time, projected over Z."""
    size = {r: n for r, n in zip(roles, array.shape)}
    nc, nz = size.get("C", 1), size.get("Z", 1)
    proj = Projection(z if "Z" in roles else "max", nc, nz)
    transpose = "YX" != "".join(r for r in roles if r in "YX")
    for zi in range(nz):
        if not proj.wants(zi):
            continue  # 'middle' reads only the middle slice's chunks
        for c in range(nc):
            index = tuple(c if r == "C" else zi if r == "Z" else slice(None) if r in "YX" else 0 for r in roles)
            plane = np.asarray(array[index])
            proj.add(c, plane.T if transpose else plane)
    return proj.result()


def _fields(path: str, plate: dict) -> list[Source]:
    """One source per field of every well the plate lists."""
    group = _open(path)
    name = str(plate.get("name") or os.path.basename(os.path.normpath(path)))
    rows = [r.get("name") for r in plate.get("rows") or []]
    columns = [c.get("name") for c in plate.get("columns") or []]
    wells = plate.get("wells")
    if not isinstance(wells, list) or not wells:
        raise ProtlocError(f"{path}: its plate metadata list no wells")
    out = []
    for well in wells:
        well_path = str(well.get("path", ""))
        try:
            well_meta = _ngff(group[well_path], f"{path}/{well_path}").get("well")
        except ProtlocError:
            raise
        except Exception:  # noqa: BLE001 - a missing group
            raise ProtlocError(f"{path}: well {well_path!r} listed in its plate metadata is missing") from None
        images = well_meta.get("images") if isinstance(well_meta, dict) else None
        if not images:
            raise ProtlocError(f"{path}/{well_path}: no well metadata listing its fields")
        row, column = well_path.split("/", 1) if "/" in well_path else (well_path, "")
        if isinstance(well.get("rowIndex"), int) and well["rowIndex"] < len(rows):
            row = rows[well["rowIndex"]]
        if isinstance(well.get("columnIndex"), int) and well["columnIndex"] < len(columns):
            column = columns[well["columnIndex"]]
        for image in images:
            field = str(image.get("path", ""))
            field_path = os.path.normpath(os.path.join(path, well_path, field))
            out.append(Source(field_path, (field_path,), None,
                              {"plate": name, "well": f"{row}{column}", "row": str(row), "column": str(column),
                               "field": field}))
    return out
