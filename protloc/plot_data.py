"""The data behind `protloc plot`: reading what the other commands wrote, and the numbers to draw.

Nothing here draws (protloc/plots.py does, with matplotlib): the readers check their files and
raise one-line ProtlocErrors naming them, and the arithmetic (2-D projections, nearest
neighbours, the image behind an embedding row) stays testable without matplotlib.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protloc.channels import canonical
from protloc.data import ViewOptions, view_of
from protloc.embeddings import Embeddings
from protloc.errors import ProtlocError
from protloc.ids import OME_EXTENSIONS, TIFF_EXTENSIONS, split_fragment
from protloc.labels import labels_of_rows, match_rows
from protloc.sources import Source

log = logging.getLogger(__name__)

METHODS = ("pca", "tsne")


def read_training_log(path) -> dict[str, np.ndarray]:
    """A `protloc pretrain --log` JSONL file -> {field: values per step}, sorted by step.

    A resumed run appends the steps after its checkpoint again: the later record of a step wins.
    A run killed mid-write can leave a broken last line: it is skipped with a warning."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ProtlocError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProtlocError(f"{path}: cannot read the training log ({e})") from None
    lines = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    records = {}
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == lines[-1][0]:
                log.warning("%s: line %d is cut short (an interrupted run?); skipped", path, n)
                continue
            raise ProtlocError(f"{path}: line {n} is not JSON (expected a `protloc pretrain --log` file)") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            raise ProtlocError(f"{path}: line {n} has no 'step' (expected a `protloc pretrain --log` file)")
        records[int(record["step"])] = record
    if not records:
        raise ProtlocError(f"{path}: no records (expected a `protloc pretrain --log` file)")
    steps = sorted(records)
    fields = {k for r in records.values() for k, v in r.items() if isinstance(v, (int, float))}
    return {k: np.array([records[s].get(k, np.nan) for s in steps], dtype=float) for k in sorted(fields)}


def read_json(path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ProtlocError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtlocError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ProtlocError(f"{path}: expected a JSON object from `protloc knn --json` or `protloc finetune --json`")
    return data


@dataclass
class KnnCurve:
    name: str  # the embeddings file's stem (random, dino, ...)
    k: np.ndarray
    mean: np.ndarray  # macro F1 per k, mean over folds
    std: np.ndarray
    protocol: str  # "5-fold, grouped", "leave-one-out", ...


def read_knn_curves(paths) -> list[KnnCurve]:
    """The runs of one or more `protloc knn --json` files, one curve per embeddings file."""
    curves, sources = [], []
    for path in paths:
        data = read_json(path)
        runs = data.get("runs")
        if not isinstance(runs, list) or not runs or not all("results" in r for r in runs):
            raise ProtlocError(f"{path}: no k-NN runs (expected a `protloc knn --json` file)")
        for run in runs:
            meta, results = run.get("meta", {}), run["results"]
            try:
                k, mean, std = (np.array([r[key] for r in results], dtype=float)
                                for key in ("k", "f1_macro_mean", "f1_macro_std"))
            except (KeyError, TypeError, ValueError):
                raise ProtlocError(f"{path}: a k-NN result lacks k, f1_macro_mean or f1_macro_std") from None
            protocol = str(meta.get("protocol", "")) + (", grouped" if meta.get("grouped") else "")
            curves.append(KnnCurve(Path(str(meta.get("embeddings", path))).stem, k, mean, std, protocol))
            sources.append(Path(path).stem)
    names = [c.name for c in curves]
    for c, source in zip(curves, sources):  # the same embeddings evaluated twice: say which file each is from
        if names.count(c.name) > 1:
            c.name = f"{source}: {c.name}"
    return curves


@dataclass
class Confusion:
    classes: list[str]
    matrix: np.ndarray  # single-label (n, n): rows true, columns predicted; multi-label (n, 2, 2) [[tn, fp], [fn, tp]]
    per_class_f1: np.ndarray
    multilabel: bool
    macro_f1: tuple[float, float, int]  # of the pooled out-of-fold predictions: mean, std, number of seeds


def read_confusion(path) -> Confusion:
    """The pooled confusion matrix and per-class F1 of a `protloc finetune --json` file."""
    data = read_json(path)
    if "runs" in data and "confusion_matrix" not in data:
        raise ProtlocError(f"{path}: k-NN results hold no confusion matrix; `protloc finetune --json` writes one")
    try:
        classes = [str(c) for c in data["classes"]]
        matrix = np.asarray(data["confusion_matrix"], dtype=float)
        per_class = np.array([data["per_class_f1"][c] for c in classes], dtype=float)  # null (not scored): NaN
        multilabel = bool(data.get("multilabel", False))
        f1 = data["macro_f1_pooled"]  # the figure the per-class F1 belong to (not the per-fold mean)
        macro = (float(f1["mean"]), float(f1["std"]), int(f1.get("n", 1)))
    except (KeyError, TypeError, ValueError) as e:
        raise ProtlocError(f"{path}: no confusion matrix and per-class F1 (expected a `protloc finetune --json` "
                           f"file with cross-validation; missing {e})") from None
    n = len(classes)
    if matrix.shape != ((n, 2, 2) if multilabel else (n, n)):
        raise ProtlocError(f"{path}: confusion matrix of shape {matrix.shape} for {n} classes")
    return Confusion(classes, matrix, per_class, multilabel, macro)


def row_labels(emb: Embeddings, labels_csv, id_column=None, label_column="label") -> list[str | None]:
    """Each embedding row's label(s) (`a;b` for several), None for rows the CSV (or the file's own
    column, `obs:COLUMN`: protloc.labels.labels_of_rows) does not label."""
    if emb.ids is None:
        raise ProtlocError(f"{emb.source}: no row ids to match labels to: pass --ids FILE or use an .npz")
    labels = labels_of_rows(emb, labels_csv, id_column=id_column, label_column=label_column, group_column=None)
    matched = match_rows(emb.ids, labels, base_dir=emb.meta.get("cwd"),
                         channel_suffixes=emb.meta.get("channel_suffixes"), require_all=False)
    if not len(matched.rows):
        raise ProtlocError(f"{labels_csv}: labels no row of {emb.source}")
    out: list[str | None] = [None] * len(emb.ids)
    for row, y in zip(matched.rows, matched.y):
        out[row] = ";".join(c for c, on in zip(matched.classes, y) if on)
    return out


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """(N, D) embeddings -> (N, 2) map and axis names. Rows are L2-normalized first: k-NN and
    DINO compare embeddings by cosine, so the map shows the geometry they see."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 4:
        raise ProtlocError(f"a map needs at least 4 rows, got {len(x)}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "pca":
        pca = PCA(2, random_state=seed).fit(x)
        names = [f"PC{i + 1} ({v:.0%} of variance)" for i, v in enumerate(pca.explained_variance_ratio_)]
        return pca.transform(x), names
    if min(x.shape) > 50:  # the usual t-SNE preprocessing: faster, and the neighbourhoods barely change
        x = PCA(50, random_state=seed).fit_transform(x)
    perplexity = min(30.0, (len(x) - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
    # Below ~10,000 rows each gradient step is too small to share: OpenMP threads only wait on each
    # other (8x slower on a busy 2-core machine), so one thread.
    with threadpool_limits(1 if len(x) < 10_000 else None, user_api="openmp"):
        return tsne.fit_transform(x), ["t-SNE 1", "t-SNE 2"]


def find_row(emb: Embeddings, query: str) -> int:
    """The row whose id is `query`, or whose id names the same file (paths resolved)."""
    if emb.ids is None:
        raise ProtlocError(f"{emb.source}: no row ids: pass --ids FILE or use an .npz")
    if query in emb.ids:
        return emb.ids.index(query)
    base = emb.meta.get("cwd") or os.getcwd()
    path, fragment = split_fragment(query)
    wanted = os.path.normpath(os.path.abspath(path)) + fragment
    hits = [r for r, i in enumerate(emb.ids) if _resolved(i, base) == wanted]
    if not hits and not fragment:  # an image whose rows are tiles or cells
        hits = [r for r, i in enumerate(emb.ids) if _resolved(split_fragment(i)[0], base) == wanted]
        if len(hits) > 1:
            raise ProtlocError(f"{emb.source}: {query} has {len(hits)} rows; name one, e.g. {emb.ids[hits[0]]}")
    if not hits:
        raise ProtlocError(f"{emb.source}: no row {query!r} (ids look like {emb.ids[0]!r})")
    return hits[0]


def _resolved(id_: str, base: str) -> str:
    path, fragment = split_fragment(id_)
    return os.path.normpath(os.path.join(base, path)) + fragment


def nearest(x: np.ndarray, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k rows most cosine-similar to `row` (itself excluded), most similar first, and their similarities."""
    x = np.asarray(x, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x[row]
    sim[row] = -np.inf
    order = np.argsort(-sim, kind="stable")[:min(k, len(x) - 1)]
    return order, sim[order]


def read_view(emb: Embeddings, row: int) -> tuple[np.ndarray, list[str]]:
    """The pixels (C, H, W) float32 and channel names of the image, tile or cell behind a row,
    re-read from the path in its id (relative to the folder `protloc embed` ran in) and cut as the
    view record in the file's meta says (a cell from its mask, re-read too), as stored (no normalization)."""
    meta = emb.meta
    image, fragment = split_fragment(emb.ids[row])
    suffixes = meta.get("channel_suffixes")
    # relative to where embed ran; failing that, to here (the folder was moved, or shared along with its images)
    for base in dict.fromkeys([meta.get("cwd") or os.getcwd(), os.getcwd()]):
        path = os.path.join(base, image)
        source = _channel_group(path, suffixes) if suffixes else Source(path, (path,), None)
        missing = [f for f in source.files if not os.path.exists(f)]
        if not missing:
            break
    if missing:
        raise ProtlocError(f"{missing[0]}: no such file (the image of row {emb.ids[row]} of {emb.source})")
    # as embed read it (the record in meta), at native size, as stored, in the file's channels
    masks = meta.get("cells")
    if masks and not (os.path.isabs(masks) or masks.startswith("{dir}")):  # relative to where embed ran, as the image
        masks = os.path.join(base, masks)
    opts = dataclasses.replace(ViewOptions.from_record(meta, emb.source), size=None, normalize="none",
                               dataset_stats=None, model_channels=None, cells=masks)
    view = view_of(source, fragment, opts)
    return view.pixels.astype(np.float32), list(view.channel_names)


def _channel_group(stem: str, suffixes: list[str]) -> Source:
    """The one-file-per-channel image `stem` (`stem_gfp.tif`, `stem_rfp.tif`, ...), as `protloc embed` grouped it."""
    files = []
    for s in suffixes:
        extensions = TIFF_EXTENSIONS + OME_EXTENSIONS + tuple(e.upper() for e in TIFF_EXTENSIONS)
        candidates = [f"{stem}_{s}{ext}" for ext in extensions]
        files.append(next((f for f in candidates if os.path.exists(f)), candidates[0]))
    return Source(stem, tuple(files), tuple(canonical(s) for s in suffixes))
