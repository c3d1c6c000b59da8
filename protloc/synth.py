"""Synthetic cells: fluorescence fields of view with a known protein-localization class.

A field holds a few cells. Each cell has an irregular body (an ellipse whose radius is perturbed by a
few low-frequency harmonics), a nucleus inside it (textured chromatin, darker nucleoli) and a tagged
protein drawn by class: nucleoplasm, nucleolus, nuclear membrane, cytoplasm, mitochondria (short
curved tubules), ER (a reticular network of band-pass-noise ridges), Golgi (a perinuclear cluster
of blobs on one side), vesicles (puncta), plasma membrane, centrosome (1-2 dots by the nucleus).
All cells of a field share the class, as in OpenCell (one tagged protein per well); their expression
level varies. Optional reference channels (microtubules radiating from the centrosome, an ER marker)
give the HPA 4-channel layout.

The imaging model makes it a fair test rather than a toy: a Gaussian PSF whose width varies per field
(focus), out-of-focus haze, background and cell autofluorescence, uneven illumination, brightness
over two decades, Poisson shot noise, Gaussian read noise and a camera offset of 100, clipped to
uint16. Every cell's protein signal is normalized to the same total per unit of cell area, so
the mean protein intensity of a field says nothing about its class; the confusable pairs
(nucleoplasm/nucleolus, mitochondria/vesicles/ER, Golgi/centrosome) stay confusable.

Everything about field `index` comes from `SeedSequence([seed, index])` (its class from the seed and
the protein), so a field is the same whatever `n` is. With `masks`, each field's cells are also
written as a label image (uint16, 0 = background, the field's i-th cell = i + 1, one label per
cell) to `masks/<field>.tif`, which `--cells OUT_DIR/masks` finds by name.
"""

from __future__ import annotations

import csv
import os
import uuid

import numpy as np
import tifffile
from scipy import ndimage

from protloc.channels import canonical
from protloc.errors import ProtlocError
from protloc.output import atomic_path

CLASSES = ("nucleoplasm", "nucleolus", "nuclear_membrane", "cytoplasm", "mitochondria", "er", "golgi",
           "vesicles", "plasma_membrane", "centrosome")
CHANNELS = ("nucleus", "protein", "microtubules", "er")
OFFSET = 100.0  # camera offset (ADU)


# ----------------------------------------------------------------------------- textures and drawing

def _noise(rng, shape, sigma, band=True):
    """Gaussian-filtered white noise with unit std; band-pass (a difference of Gaussians) when
    `band`, so its zero contours form an even, closed network instead of drifting blobs.
    Filtered in Fourier space: the cost does not grow with sigma (periodic edges are fine here)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f2 = (2 * np.pi**2) * (fy**2 + fx**2)
    gain = np.exp(-f2 * sigma**2)
    if band:
        gain -= np.exp(-f2 * (2.5 * sigma) ** 2)
    n = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * gain, s=shape).astype(np.float32)
    return n / (n.std() + 1e-8)


def _splat(shape, y, x, w):
    """Add weights `w` at points (y, x) to an image (nearest pixel; the PSF smooths it later)."""
    yi, xi = np.rint(y).astype(np.int64), np.rint(x).astype(np.int64)
    keep = (yi >= 0) & (yi < shape[0]) & (xi >= 0) & (xi < shape[1])
    flat = yi[keep] * shape[1] + xi[keep]
    w = np.broadcast_to(w, yi.shape)[keep]
    return np.bincount(flat, weights=w, minlength=shape[0] * shape[1]).reshape(shape).astype(np.float32)


def _curves(rng, y0, x0, length, step, turn):
    """Random smooth curves from (y0, x0): arrays (N, S) of points `step` apart, NaN past `length`."""
    n, s = len(y0), int(np.ceil(length.max() / step)) + 1
    theta0 = rng.uniform(0, 2 * np.pi, n)
    # Curvature is a per-curve constant plus a random walk: arcs and gentle wiggles, no kinks.
    theta = (theta0[:, None] + rng.normal(0, turn, (n, 1)) * np.arange(s)
             + np.cumsum(rng.normal(0, turn, (n, s)), axis=1))
    y = y0[:, None] + step * np.cumsum(np.sin(theta), axis=1)
    x = x0[:, None] + step * np.cumsum(np.cos(theta), axis=1)
    past = np.arange(s) * step > length[:, None]
    y[past], x[past] = np.nan, np.nan
    return y, x


def _radius(theta, r, aspect, angle, amps, phases):
    """Boundary radius at angle theta: an ellipse of area ~pi r^2, perturbed by harmonics 2, 3, ..."""
    a, b = r / np.sqrt(aspect), r * np.sqrt(aspect)
    t = theta - angle
    out = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    pert = 1.0
    for k, (amp, ph) in enumerate(zip(amps, phases), start=2):
        pert = pert + amp * np.cos(k * theta + ph)
    return out * pert


def _shape(rng, r, aspect_lo, wobble):
    """Random shape parameters for `_radius`: aspect ratio, orientation, harmonic amplitudes."""
    return dict(r=r, aspect=rng.uniform(aspect_lo, 1.0), angle=rng.uniform(0, np.pi),
                amps=rng.uniform(0, wobble, 3) / np.arange(1, 4), phases=rng.uniform(0, 2 * np.pi, 3))


# ----------------------------------------------------------------------------- geometry of a field

def _cells(rng, size):
    """Place 1-6 non-overlapping cell bodies; returns a list of dicts of cell geometry parameters."""
    n_max = min(6, max(2, size // 40))
    n = int(rng.integers(1 if size < 128 else 2, n_max + 1))
    cells = []
    for _ in range(n):
        r = float(np.clip(size * np.sqrt(0.3 / (np.pi * n)) * rng.uniform(0.8, 1.15), 8, 60))
        for _try in range(60):  # rejection sampling; a field that is full just gets fewer cells
            cy, cx = rng.uniform(0.3 * r, size - 0.3 * r, 2)
            if all(np.hypot(cy - c["cy"], cx - c["cx"]) > 0.95 * (r + c["body"]["r"]) for c in cells):
                break
        else:
            continue
        body = _shape(rng, r, 0.45, 0.4)
        rn = r * rng.uniform(0.33, 0.48)
        off, phi = rng.uniform(0, 0.3 * (r - rn)), rng.uniform(0, 2 * np.pi)
        ny, nx = cy + off * np.sin(phi), cx + off * np.cos(phi)
        nucleus = _shape(rng, rn, 0.65, 0.08)
        # Nucleoli: 1-4, placed in the inner part of the nucleus.
        k = int(rng.integers(1, 5))
        rr, aa = rn * 0.55 * np.sqrt(rng.uniform(0, 1, k)), rng.uniform(0, 2 * np.pi, k)
        nucleoli = np.stack([ny + rr * np.sin(aa), nx + rr * np.cos(aa), rn * rng.uniform(0.1, 0.2, k)], 1)
        # The centrosome (microtubule organizing centre) sits just outside the nucleus, and the
        # Golgi ribbon wraps around it: the same side of the nucleus for both.
        side = rng.uniform(0, 2 * np.pi)
        rside = _radius(side, **nucleus) * rng.uniform(1.08, 1.3)
        mtoc = (ny + rside * np.sin(side), nx + rside * np.cos(side))
        reach = int(np.ceil(1.45 * r)) + 3
        box = (max(0, int(cy) - reach), min(size, int(cy) + reach + 1),
               max(0, int(cx) - reach), min(size, int(cx) + reach + 1))
        cells.append(dict(cy=cy, cx=cx, body=body, ny=ny, nx=nx, nucleus=nucleus, nucleoli=nucleoli,
                          side=side, mtoc=mtoc, box=box, level=rng.lognormal(0, 0.35),
                          dna=rng.lognormal(0, 0.15)))
    return cells


def _views(cells, size):
    """Per-cell masks and distance maps on each cell's bounding box. Touching cells split the
    pixels between them by normalized distance (each pixel goes to the cell it is deepest in)."""
    rho_min = np.full((size, size), np.inf, np.float32)
    owner = np.full((size, size), -1, np.int32)
    views = []
    for i, c in enumerate(cells):
        y0, y1, x0, x1 = c["box"]
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - c["cy"]
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - c["cx"]
        dist, th = np.hypot(dy, dx), np.arctan2(dy, dx)
        rho = dist / _radius(th, **c["body"])
        sub = rho_min[y0:y1, x0:x1]
        closer = rho < sub
        sub[closer] = rho[closer]
        owner[y0:y1, x0:x1][closer] = i
        views.append(dict(rho=rho))
    for i, (c, v) in enumerate(zip(cells, views)):
        y0, y1, x0, x1 = c["box"]
        yy = np.arange(y0, y1, dtype=np.float32)[:, None]
        xx = np.arange(x0, x1, dtype=np.float32)[None, :]
        dy, dx = yy - c["ny"], xx - c["nx"]
        dist = np.hypot(dy, dx)
        rn = _radius(np.arctan2(dy, dx), **c["nucleus"])
        own = owner[y0:y1, x0:x1] == i
        cell = own & (v["rho"] < 1)
        rho_n = dist / rn
        nuc = cell & (rho_n < 1)
        nol = np.zeros_like(dist)
        for y, x, s in c["nucleoli"]:
            nol = np.maximum(nol, np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s)))
        v.update(own=own, cell=cell, nuc=nuc, cyto=cell & ~nuc, sd_n=dist - rn, 
                 r=float(c["body"]["r"]), nol=nol * nuc, y0=y0, x0=x0,
                 dome=np.sqrt(np.clip(1 - v["rho"] ** 2, 0, 1)) * cell,
                 dome_n=np.sqrt(np.clip(1 - rho_n ** 2, 0, 1)) * nuc,
                 d_out=np.maximum(dist - rn, 0), mtoc=(c["mtoc"][0] - y0, c["mtoc"][1] - x0),
                 cny=c["ny"] - y0, cnx=c["nx"] - x0, nshape=c["nucleus"], side=c["side"])
    return views


def _sample(rng, mask, weight, n):
    """n random points (y, x) in `mask`, with probability proportional to `weight`."""
    idx = np.flatnonzero(mask)
    if idx.size == 0 or n == 0:
        return np.zeros(0), np.zeros(0)
    p = weight.ravel()[idx].astype(np.float64)
    pick = rng.choice(idx, size=n, p=p / p.sum())
    y, x = np.divmod(pick, mask.shape[1])
    return y + rng.uniform(-0.5, 0.5, n), x + rng.uniform(-0.5, 0.5, n)


def _at(a, y, x):
    """Values of `a` at the nearest pixel of points (y, x); 0 off the array or for NaN points."""
    yi = np.nan_to_num(np.rint(y), nan=-1).astype(np.int64)
    xi = np.nan_to_num(np.rint(x), nan=-1).astype(np.int64)
    ok = (yi >= 0) & (yi < a.shape[0]) & (xi >= 0) & (xi < a.shape[1])
    out = np.zeros(yi.shape, a.dtype)
    out[ok] = a[yi[ok], xi[ok]]
    return out


def _unit(p):
    """p scaled to sum 1 (all zeros stays zeros: a cell cut by the field edge may lack a part)."""
    return p / max(float(p.sum()), 1e-8)


def _ring(sd, width):
    return np.exp(-0.5 * (sd / width) ** 2).astype(np.float32)


# ----------------------------------------------------------------------------- what each channel shows

def _er_network(v, tex):
    """The ER: ridges along the zero contours of band-pass noise, denser by the nucleus, continuous
    with the nuclear envelope. The same network serves the ER marker and ER-class proteins."""
    ridge = np.exp(-(tex["er"] / tex["er_width"]) ** 2)
    near = np.exp(-v["d_out"] / (0.35 * v["r"]))
    cyto = v["cyto"] * (0.3 + v["dome"])
    return ridge * cyto * (0.3 + near) + 0.1 * near * cyto + 0.6 * _ring(v["sd_n"], 0.8) * v["own"]


def _protein(label, rng, v, tex, t):
    """Unnormalized protein signal of one cell (bounding-box crop) for class `label`.
    `t` holds traits shared by all fields of a protein (structure size, counts, diffuse pool)."""
    shape, cyto, r = v["cell"].shape, v["cyto"], v["r"]
    area = max(int(cyto.sum()), 1)
    perinuclear = np.exp(-v["d_out"] / (0.5 * r)) + 0.3
    nucleoplasm = v["dome_n"] * (1 - 0.8 * v["nol"]) * np.clip(1 + t["grain"] * tex["fine"], 0.1, None)
    cytosol = cyto * (0.2 + v["dome"]) * np.clip(1 + 0.15 * tex["fine"], 0.1, None)
    if label == "nucleoplasm":
        p = nucleoplasm
    elif label == "nucleolus":
        p = v["nol"] ** 1.5 + rng.uniform(0.03, 0.2) * nucleoplasm
    elif label == "nuclear_membrane":
        p = _ring(v["sd_n"], rng.uniform(0.6, 1.1)) * v["own"] * np.clip(1 + 0.4 * tex["fine"], 0, None)
        p += rng.uniform(0.0, 0.05) * nucleoplasm
    elif label == "cytoplasm":
        p = cytosol
    elif label == "mitochondria":
        n = int(area / rng.uniform(25, 45) * t["count"])
        y0, x0 = _sample(rng, cyto, perinuclear, n)
        y, x = _curves(rng, y0, x0, rng.uniform(2, 11, n) * t["scale"], 0.5, 0.08)
        w = np.broadcast_to(rng.uniform(0.5, 1.5, (n, 1)), y.shape)
        ok = ~np.isnan(y)
        p = _splat(shape, y[ok], x[ok], w[ok]) * cyto
    elif label == "er":
        p = _er_network(v, tex)
    elif label == "golgi":
        # A ribbon of blobs hugging the nucleus on the centrosome's side, plus a few stray puncta.
        n = int(rng.integers(4, 20) * t["count"]) + 2
        ang = v["side"] + rng.normal(0, rng.uniform(0.2, 0.8), n)
        rad = _radius(ang, **v["nshape"]) * rng.uniform(1.05, 1.4, n) + rng.normal(0, 1.5, n)
        y, x = v["cny"] + rad * np.sin(ang), v["cnx"] + rad * np.cos(ang)
        p = ndimage.gaussian_filter(_splat(shape, y, x, rng.uniform(0.5, 1.5, n)), rng.uniform(0.7, 1.5) * t["scale"])
        yy, xx = np.indices(shape)
        near = np.exp(-np.hypot(yy - v["mtoc"][0], xx - v["mtoc"][1]) / (0.25 * r))
        ys, xs = _sample(rng, cyto, near, int(rng.integers(0, 8)))
        p += _splat(shape, ys, xs, 0.3)
    elif label == "vesicles":
        n = int(area / rng.uniform(10, 30) * t["count"])
        y, x = _sample(rng, cyto, perinuclear, n)
        p = _splat(shape, y, x, rng.lognormal(0, 0.5, n))
        p = ndimage.gaussian_filter(p, 0.5 * t["scale"]) * cyto
    elif label == "plasma_membrane":
        # Distance to the cell's own edge (not the field's), so touching cells both show a membrane.
        edge = ndimage.distance_transform_edt(np.pad(v["cell"], 1, constant_values=True))[1:-1, 1:-1]
        p = _ring(edge - 0.5, rng.uniform(0.7, 1.4)) * v["cell"] + rng.uniform(0.05, 0.25) * v["dome"]
    elif label == "centrosome":
        my, mx = v["mtoc"]
        k = int(rng.integers(1, 3))
        ang = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(1.2, 2.5) * np.arange(k)
        p = _splat(shape, my + d * np.sin(ang), mx + d * np.cos(ang), 1.0)
        # Pericentriolar cloud and a cytosolic pool, both common for centrosomal proteins.
        p = ndimage.gaussian_filter(p, rng.uniform(0.3, 1.0)) + rng.uniform(0, 0.03) * ndimage.gaussian_filter(p, 3)
        p = _unit(p) + rng.uniform(0.3, 1.5) * _unit(cytosol)
    else:
        raise ProtlocError(f"unknown class {label!r}; known: {', '.join(CLASSES)}")
    return _unit(p) + t["diffuse"] * _unit(cytosol)


def _microtubules(rng, v):
    """Filaments from the centrosome to the cell border (dimmer over the nucleus) over a tubulin haze."""
    shape, r = v["cell"].shape, v["r"]
    n = int(rng.integers(25, 50))
    my, mx = v["mtoc"]
    y, x = _curves(rng, np.full(n, my), np.full(n, mx), np.full(n, 2.5 * r), 0.6, 0.01)
    keep = np.cumprod(_at(v["cell"], y, x), axis=1).astype(bool)  # a filament ends where it leaves the cell
    w = np.where(_at(v["nuc"], y, x), 0.4, 1.0)
    p = _splat(shape, y[keep], x[keep], w[keep])
    return _unit(p) + 0.5 * _unit(v["dome"])


def _nucleus(v, tex):
    """Hoechst: bright, dome-shaped, chromatin texture, dark nucleoli."""
    return v["dome_n"] ** 0.5 * np.clip(1 + tex["chromatin_amp"] * tex["chromatin"], 0.15, None) * (1 - 0.65 * v["nol"])


# ----------------------------------------------------------------------------- the field

def _check_channels(channels):
    names = [canonical(c) for c in channels]
    if not names:
        raise ProtlocError(f"synth needs at least one channel; choose from {', '.join(CHANNELS)}")
    unknown = [c for c, name in zip(channels, names) if name not in CHANNELS]
    if unknown:
        raise ProtlocError(f"synth cannot draw channel(s) {', '.join(map(repr, unknown))}; "
                           f"it draws {', '.join(CHANNELS)}")
    if len(set(names)) != len(names):
        raise ProtlocError(f"channel names repeat: {', '.join(channels)}")
    return names


def _traits(rng):
    """What one protein's fields share: structure size and count, a diffuse pool, expression."""
    return dict(scale=rng.uniform(0.75, 1.35), count=rng.uniform(0.7, 1.4), diffuse=rng.uniform(0, 0.25),
                grain=rng.uniform(0.1, 0.5), brightness=rng.lognormal(0, 0.5))


def _label_image(cells, views, size):
    """The field's cells as a label image: cell i is label i + 1 on the pixels it owns, 0 elsewhere."""
    labels = np.zeros((size, size), np.uint16)
    for i, (c, v) in enumerate(zip(cells, views)):
        y0, y1, x0, x1 = c["box"]
        labels[y0:y1, x0:x1][v["cell"]] = i + 1
    return labels


def _field(rng, label, size, channels, traits):
    """(C, size, size) uint16 pixels and the (size, size) uint16 label image of the cells."""
    if label not in CLASSES:
        raise ProtlocError(f"unknown class {label!r}; known: {', '.join(CLASSES)}")
    if size < 32:
        raise ProtlocError(f"size must be at least 32 pixels, got {size}")
    names = _check_channels(channels)
    # Geometry first, then one generator per channel (always all of them, in CHANNELS order), so
    # the cells, and each channel's content, do not depend on which channels were asked for.
    cells = _cells(rng, size)
    views = _views(cells, size)
    tex_full = dict(er=_noise(rng, (size, size), rng.uniform(1.6, 2.6)), fine=_noise(rng, (size, size), 0.8),
                    chromatin=_noise(rng, (size, size), rng.uniform(0.7, 1.3)))
    illum = np.clip(1 + 0.12 * _noise(rng, (size, size), size / 4, band=False), 0.5, 1.5)
    psf = rng.uniform(0.6, 1.4)
    haze = rng.uniform(0.0, 0.2)
    gain, read = rng.uniform(0.6, 2.5), rng.uniform(1.5, 5.0)
    er_width, chromatin_amp = rng.uniform(0.15, 0.3), rng.uniform(0.25, 0.5)
    rngs = {name: np.random.default_rng(rng.integers(2**63)) for name in CHANNELS}

    out = np.empty((len(names), size, size), np.uint16)
    for ci, name in enumerate(names):
        crng = rngs[name]
        signal = np.zeros((size, size), np.float32)
        autofluo = np.zeros((size, size), np.float32)
        for c, v in zip(cells, views):
            y0, y1, x0, x1 = c["box"]
            tex = {k: a[y0:y1, x0:x1] for k, a in tex_full.items()}
            tex.update(er_width=er_width, chromatin_amp=chromatin_amp)
            if name == "protein":
                p = _protein(label, crng, v, tex, traits) * c["level"]
            elif name == "nucleus":
                p = _unit(_nucleus(v, tex)) * c["dna"]
            elif name == "microtubules":
                p = _microtubules(crng, v)
            else:
                p = _unit(_er_network(v, tex))
            # Same total per unit of cell area for every class: mean intensity carries no class.
            signal[y0:y1, x0:x1] += p * float(v["cell"].sum())
            autofluo[y0:y1, x0:x1] += v["dome"]
        # Optics: in-focus PSF plus a broad out-of-focus haze; then photons.
        s = psf * crng.uniform(0.95, 1.1)
        img = ((1 - haze) * ndimage.gaussian_filter(signal, s)
               + haze * ndimage.gaussian_filter(signal, 5 * s, truncate=2.5))
        img = np.maximum(img, 0)  # filtering rounds to tiny negatives; Poisson refuses those
        bright = np.exp(crng.uniform(np.log(15), np.log(2000)))
        if name == "protein":
            bright *= traits["brightness"]
        photons = bright * img + crng.uniform(0.5, 6) * autofluo + crng.uniform(1, 20)
        photons *= illum
        # A microscopist keeps the brightest structure out of saturation.
        peak = float(photons.max()) * gain + OFFSET + 5 * read
        if peak > 60000:
            photons *= 60000 / peak
        adu = crng.poisson(photons).astype(np.float32) * gain + OFFSET + crng.normal(0, read, photons.shape)
        out[ci] = np.clip(np.rint(adu), 0, 65535).astype(np.uint16)
    return out, _label_image(cells, views, size)


def synth_field(rng: np.random.Generator, label: str, size: int, channels: list[str]) -> np.ndarray:
    """One field of view: (C, size, size) uint16, several cells whose protein channel shows `label`."""
    return _field(rng, label, size, channels, _traits(rng))[0]


# ----------------------------------------------------------------------------- a data set on disk

def _protein_class(seed, k):
    """Class of protein k: each block of len(CLASSES) proteins takes every class once, in an order
    shuffled by (seed, block), so classes stay balanced and any n gives the same answer."""
    block, pos = divmod(k, len(CLASSES))
    order = np.random.default_rng(np.random.SeedSequence([seed, block, 0x5EED])).permutation(len(CLASSES))
    return CLASSES[order[pos]]


def write_dataset(out_dir: str | os.PathLike, n: int, size: int = 256, channels: list[str] = ["nucleus", "protein"],
                  seed: int = 0, fields_per_protein: int = 4, progress=None, masks: bool = False) -> list[dict]:
    """Write n fields as OME-TIFF + labels.csv into out_dir (must exist or is created), and with
    `masks` their cell label images into out_dir/masks; returns the label rows."""
    if n < 1:
        raise ProtlocError(f"n must be at least 1, got {n}")
    if size < 32:
        raise ProtlocError(f"size must be at least 32 pixels, got {size}")
    if fields_per_protein < 1:
        raise ProtlocError(f"fields_per_protein must be at least 1, got {fields_per_protein}")
    names = _check_channels(list(channels))
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "masks") if masks else out_dir, exist_ok=True)
    width = max(5, len(str(n - 1)))
    rows = []
    for i in range(n):
        k = i // fields_per_protein
        label = _protein_class(seed, k)
        traits = _traits(np.random.default_rng(np.random.SeedSequence([seed, k, 0x9207])))
        img, cells = _field(np.random.default_rng(np.random.SeedSequence([seed, i])), label, size, names, traits)
        rel = f"field_{i:0{width}d}.tif"
        # OME-XML wants a UUID per file; a random one would make equal images differ in bytes.
        uid = uuid.uuid5(uuid.NAMESPACE_URL, f"protloc-synth:{seed}:{i}:{size}:{','.join(names)}")
        meta = {"axes": "CYX", "Channel": {"Name": names}, "UUID": f"urn:uuid:{uid}"}
        # atomic: a run killed mid-write leaves a hidden temporary file, which discovery skips
        with atomic_path(os.path.join(out_dir, rel)) as tmp:
            tifffile.imwrite(tmp, img, ome=True, photometric="minisblack", compression="zlib", metadata=meta)
        if masks:
            with atomic_path(os.path.join(out_dir, "masks", rel)) as tmp:
                tifffile.imwrite(tmp, cells, photometric="minisblack", compression="zlib")
        rows.append({"path": rel, "label": label, "group": f"prot_{k:04d}"})
        if progress is not None:
            progress(1)

    with atomic_path(os.path.join(out_dir, "labels.csv")) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return rows
