"""Labels CSV: reading it, and matching embedding rows to its labels.

A labels CSV names images by `path` (relative to the CSV's folder, or absolute) or by `id`, gives
each a `label` (several separated by `;` make the task multi-label) and optionally a `group`
(the protein or gene: cross-validation never puts one group on both sides). A row may also name
one tile or cell, `path#cell=K` (`id#cell=K`): a label of that row only (single-cell labels),
where a plain `path` labels all rows of its image. Column names can be overridden, so existing
tables work as they are, e.g. a yeast screen table with
`id_column="protein_file", label_column="control_localization", group_column="gene"`.

Labels and groups can also come from an embeddings file's own per-row columns (AnnData's obs,
the .npz's obs: protloc.row_meta), named `obs:COLUMN` where a CSV would be (labels_of_rows): a
row with an empty value there is unlabelled; `a;b` is multi-label, as in a CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from dataclasses import dataclass

import numpy as np

from protloc.channels import ALIASES, VOCABULARY
from protloc.embeddings import Embeddings
from protloc.errors import ProtlocError
from protloc.ids import group_stem, image_of, split_fragment, stem

log = logging.getLogger(__name__)

OBS = "obs:"  # `--labels obs:COLUMN`, `--groups obs:COLUMN`: a column of the embeddings file itself

# File suffixes of one-file-per-channel layouts (`X_gfp.tif`, `X_blue.tif`) when none are given.
DEFAULT_SUFFIXES = tuple(sorted(set(ALIASES) | set(VOCABULARY)))


@dataclass
class Labels:
    keys: list[str]                 # per row: absolute normalized path ('path' column) or the id, then
                                    # the row's #tile=K / #cell=K fragment if it names one view
    labels: list[tuple[str, ...]]   # per row: class names, sorted and unique
    groups: list[str] | None        # per row, or None without a group column
    classes: list[str]              # all class names, sorted
    multilabel: bool                # some row has more than one label
    source: str                     # the CSV's path, for messages
    by_path: bool                   # keys are paths (match by file) rather than free-form ids


@dataclass
class Matched:
    rows: np.ndarray                # indices of the embedding rows that have a label, ascending
    ids: list[str]                  # the ids of those rows
    y: np.ndarray                   # (len(rows), n_classes) uint8 indicator matrix
    groups: np.ndarray | None       # group per matched row (str), or None
    classes: list[str]
    multilabel: bool
    unlabeled: int                  # embedding rows without a label (ignored)
    source: str                     # the labels CSV, for messages


def read_labels(csv_path, id_column: str | None = None, label_column: str = "label",
                group_column: str | None = "group") -> Labels:
    """Read a labels CSV.

    id_column None means `path` if the CSV has it, else `id`. A column called `id` holds
    free-form ids, kept as strings; any other (`path`, or a custom one like `protein_file`) holds
    file paths, resolved against the CSV's folder (absolute, normalized). The group column is
    optional when it is the default `group`; a group column named explicitly must exist; None
    reads no groups. Every field is stripped of surrounding blanks; class names that differ only
    in case are one class (the most frequent spelling; a warning names them). Rows repeated with
    the same labels and group are kept once (with a warning); the same key with different labels
    or groups is an error.
    """
    src = str(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except FileNotFoundError:
        raise ProtlocError(f"{src}: no such labels file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ProtlocError(f"{src}: cannot read labels CSV ({e})") from None

    available = ", ".join(header) if header else "none"
    if id_column is None:
        id_column = "path" if "path" in header else "id" if "id" in header else None
        if id_column is None:
            raise ProtlocError(f"{src}: needs a 'path' or 'id' column (or name one); columns are: {available}")
    for name in (id_column, label_column):
        if name not in header:
            raise ProtlocError(f"{src}: no column '{name}'; columns are: {available}")
    if group_column is not None and group_column not in header:
        if group_column != "group":
            raise ProtlocError(f"{src}: no column '{group_column}'; columns are: {available}")
        group_column = None
    if not rows:
        raise ProtlocError(f"{src}: no rows")

    by_path = id_column != "id"  # any column other than 'id' holds file paths (e.g. protein_file)
    base = os.path.dirname(os.path.abspath(src))
    parsed = []  # (line, raw id, key, class names as written (stripped), group)
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        raw = (row.get(id_column) or "").strip()
        if not raw:
            raise ProtlocError(f"{src}: line {line}: empty '{id_column}'")
        path, fragment = split_fragment(raw)
        key = os.path.normpath(os.path.join(base, os.path.expanduser(path))) + fragment if by_path else raw
        names = {s.strip() for s in (row.get(label_column) or "").split(";") if s.strip()}
        if not names:
            raise ProtlocError(f"{src}: line {line}: empty '{label_column}' for {raw}")
        group = None
        if group_column is not None:
            group = (row.get(group_column) or "").strip()
            if not group:
                raise ProtlocError(f"{src}: line {line}: empty '{group_column}' for {raw}")
        parsed.append((line, raw, key, names, group))

    canonical = _canonical_classes([names for _, _, _, names, _ in parsed], src)
    seen: dict[str, int] = {}
    keys, labels, groups = [], [], []
    repeated = 0
    for line, raw, key, names, group in parsed:
        names = tuple(sorted({canonical[n] for n in names}))
        if key in seen:
            i = seen[key]
            if labels[i] != names or (groups[i] if groups else None) != group:
                raise ProtlocError(f"{src}: line {line}: {raw} is listed again with a different label or group")
            repeated += 1
            continue
        seen[key] = len(keys)
        keys.append(key)
        labels.append(names)
        if group is not None:
            groups.append(group)
    if repeated:
        log.warning("%s: %d repeated rows (same key, label and group) kept once", src, repeated)

    return Labels(keys=keys, labels=labels, groups=groups if group_column is not None else None,
                  classes=sorted({c for names in labels for c in names}),
                  multilabel=any(len(names) > 1 for names in labels), source=src, by_path=by_path)


def obs_column(spec: str | None) -> str | None:
    """`obs:COLUMN` -> COLUMN; anything else (a CSV path, None) -> None."""
    return str(spec)[len(OBS):] if spec is not None and str(spec).startswith(OBS) else None


def labels_of_rows(emb: Embeddings, labels_spec: str, groups_spec: str | None = None, *, id_column: str | None = None,
                   label_column: str = "label", group_column: str | None = "group",
                   channel_suffixes: list[str] | None = None) -> Labels:
    """The labels of an embeddings file's rows: from a labels CSV (read_labels; `id_column`,
    `label_column`, `group_column` as there), or `obs:COLUMN` from the file's own per-row columns,
    each with groups from `groups_spec` `obs:COLUMN` instead of the CSV's group column. Labels
    that involve obs are keyed by the row ids (match_rows matches them exactly); a CSV's are
    matched to the rows here first (relative to the folder embed ran in, `channel_suffixes` or
    those recorded). Raises ProtlocError naming a missing column, or an empty group of a labelled row."""
    label_obs, group_obs = obs_column(labels_spec), obs_column(groups_spec)
    if groups_spec is not None and group_obs is None:
        raise ProtlocError(f"{groups_spec}: groups come from a column of the embeddings file, obs:COLUMN (a labels "
                           "CSV's own group column: --group-column)")
    if label_obs is None and group_obs is None:
        return read_labels(labels_spec, id_column=id_column, label_column=label_column, group_column=group_column)
    groups = _obs_values(emb, group_obs) if group_obs is not None else None
    if label_obs is not None:
        per_row = [{n.strip() for n in v.split(";") if n.strip()} for v in _obs_values(emb, label_obs)]
        source = f"{emb.source} {labels_spec}"
    else:  # a CSV's labels, matched to the rows, with the file's groups
        csv_labels = read_labels(labels_spec, id_column=id_column, label_column=label_column, group_column=None)
        matched = match_rows(emb.ids, csv_labels, base_dir=emb.meta.get("cwd"),
                             channel_suffixes=channel_suffixes or emb.meta.get("channel_suffixes"))
        per_row = [set() for _ in emb.ids]
        for r, y in zip(matched.rows, matched.y):
            per_row[r] = {c for c, on in zip(matched.classes, y) if on}
        source = labels_spec
    rows = [r for r, names in enumerate(per_row) if names]
    if not rows:
        raise ProtlocError(f"{source}: labels no row of {emb.source}")
    if groups is not None:
        empty = next((r for r in rows if not groups[r]), None)
        if empty is not None:
            raise ProtlocError(f"{emb.source}: row {emb.ids[empty]} has a label but an empty {groups_spec}")
    canonical = _canonical_classes([per_row[r] for r in rows], source)
    labels = [tuple(sorted({canonical[n] for n in per_row[r]})) for r in rows]
    return Labels(keys=[emb.ids[r] for r in rows], labels=labels,
                  groups=[groups[r] for r in rows] if groups is not None else None,
                  classes=sorted({c for names in labels for c in names}),
                  multilabel=any(len(names) > 1 for names in labels), source=source, by_path=False)


def _obs_values(emb: Embeddings, column: str) -> list[str]:
    """A per-row column of the embeddings file as strings, stripped; missing values ("", NaN) are ""."""
    if not emb.obs:
        raise ProtlocError(f"{emb.source}: no per-row columns to take obs:{column} from (an .npy; use the .npz or "
                           ".h5ad from `protloc embed`, or a labels CSV)")
    if column not in emb.obs:
        raise ProtlocError(f"{emb.source}: no obs column '{column}'; columns are: {', '.join(emb.obs) or 'none'}")
    return ["" if v is None or (isinstance(v, float) and v != v) else str(v).strip() for v in emb.obs[column]]


def _canonical_classes(names_per_row: list[set[str]], source: str) -> dict[str, str]:
    """Class name as written -> the class: names that differ only in case are one class, spelt as
    most rows spell it (ties: the spelling met first), with one warning naming the spellings."""
    counts: dict[str, int] = {}  # insertion order: the order spellings are met
    for names in names_per_row:
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    spellings: dict[str, list[str]] = {}
    for name in counts:
        spellings.setdefault(name.casefold(), []).append(name)
    canonical, merged = {}, []
    for same in spellings.values():
        chosen = max(same, key=counts.__getitem__)  # the first of the most frequent
        canonical.update(dict.fromkeys(same, chosen))
        if len(same) > 1:
            merged.append(" and ".join(f"'{n}' ({counts[n]} row{'s' if counts[n] != 1 else ''})" for n in same)
                          + f" -> '{chosen}'")
    if merged:
        log.warning("%s: class names that differ only in case are taken as one class: %s", source, "; ".join(merged))
    return canonical


def images_of(labels: Labels) -> Labels:
    """The labels as whole images: a view's key (`path#cell=K`) stands for its image, whose labels
    are those of all its keys together. For choosing which images to read, not for training."""
    united: dict[str, set] = {}
    groups: dict[str, str] = {}
    for i, key in enumerate(labels.keys):
        image = image_of(key)
        united.setdefault(image, set()).update(labels.labels[i])
        if labels.groups is not None:
            groups.setdefault(image, labels.groups[i])
    return dataclasses.replace(labels, keys=list(united), labels=[tuple(sorted(v)) for v in united.values()],
                               groups=list(groups.values()) if labels.groups is not None else None)


def _path_forms(key: str, suffixes: list[str]) -> set[str]:
    """Loose forms of a label path that an embedding id may equal: without its TIFF extension,
    and, for one file of a per-channel group, its group's stem (protloc.ids.group_stem)."""
    group = group_stem(key, suffixes)
    return {stem(key)} | ({group[0]} if group else set())


def match_rows(ids: list[str], labels: Labels, base_dir: str | None = None,
               channel_suffixes: list[str] | None = None, require_all: bool = True) -> Matched:
    """Find the labelled embedding rows.

    Matching rules:
    - An embedding id is written by `protloc embed`: a path, relative to `base_dir` (the working
      directory at embed time; default: the current one) or absolute, optionally followed by
      `#tile=K` or `#cell=K`. A label naming that view (`path#cell=K`) matches it first; failing
      that, the fragment is dropped: an image's label covers all its tiles and cells, so several
      rows can match one label.
    - 'id' labels: the id (with its fragment, then without) must equal the label's id exactly.
    - 'path' labels: absolute normalized paths are compared. Failing an exact match, the id with
      its TIFF extension (.tif/.tiff/.ome.tif/.ome.tiff, any case) removed may equal the label
      path with its TIFF extension removed, or with its extension and a trailing `_<suffix>`
      removed for a suffix in `channel_suffixes` (default: the channel names and aliases of
      `protloc.channels`, e.g. gfp, rfp, blue, green). This lets a one-file-per-channel image,
      whose id is the stem `dir/X` of `dir/X_gfp.tif` and `dir/X_rfp.tif`, match a CSV that
      lists either file.
    - Every image label must match some row (else ProtlocError naming the first few; with
      `require_all` False, as after images were skipped, they need not); a view label without a
      row (a cell left out at the image border, say) is a warning. Embedding rows without a label
      are ignored and counted in `unlabeled`.
    """
    suffixes = list(DEFAULT_SUFFIXES if channel_suffixes is None else channel_suffixes)
    base = os.path.abspath(base_dir if base_dir is not None else os.getcwd())
    exact = {key: i for i, key in enumerate(labels.keys)}
    loose: dict[str, list[int]] = {}
    if labels.by_path:
        for i, key in enumerate(labels.keys):
            path, fragment = split_fragment(key)
            for form in _path_forms(path, suffixes):
                loose.setdefault(form + fragment, []).append(i)

    rows, label_of_row = [], []
    used = np.zeros(len(labels.keys), dtype=bool)
    for r, id_ in enumerate(ids):
        stripped, fragment = split_fragment(str(id_))
        hits = []
        for f in ([fragment, ""] if fragment else [""]):  # the view's own label, then its image's
            if not labels.by_path:
                hits = [exact[stripped + f]] if stripped + f in exact else []
            else:
                path = os.path.normpath(os.path.join(base, stripped))
                hits = [exact[path + f]] if path + f in exact else loose.get(stem(path) + f, [])
            if hits:
                break
        if not hits:
            continue
        first = hits[0]
        for i in hits[1:]:  # e.g. both X_gfp.tif and X_rfp.tif listed for the image X
            if labels.labels[i] != labels.labels[first] or (labels.groups and labels.groups[i] != labels.groups[first]):
                raise ProtlocError(f"{labels.source}: {_shown(labels, first)} and {_shown(labels, i)} "
                                   f"both match embedding id {id_} but have different labels or groups")
        used[hits] = True
        rows.append(r)
        label_of_row.append(first)

    missing = np.flatnonzero(~used)
    views = [i for i in missing if split_fragment(labels.keys[i])[1]]
    if views:
        log.warning("%s: %d labelled tile(s) or cell(s) have no embedding row (ignored), e.g. %s", labels.source,
                    len(views), ", ".join(_shown(labels, i) for i in views[:3]))
    missing = [i for i in missing if not split_fragment(labels.keys[i])[1]] if require_all else []
    if len(missing):
        n = len(missing)
        examples = ", ".join(_shown(labels, i) for i in missing[:5])
        raise ProtlocError(f"{labels.source}: {n} labelled image{'s' if n != 1 else ''} "
                           f"{'have' if n != 1 else 'has'} no embedding row, e.g. {examples}")

    index = {c: j for j, c in enumerate(labels.classes)}
    y = np.zeros((len(rows), len(labels.classes)), dtype=np.uint8)
    for m, i in enumerate(label_of_row):
        y[m, [index[c] for c in labels.labels[i]]] = 1
    groups = np.asarray([labels.groups[i] for i in label_of_row], dtype=str) if labels.groups is not None else None
    if len(ids) > len(rows):
        log.info("%d of %d embedding rows have no label in %s", len(ids) - len(rows), len(ids), labels.source)
    return Matched(rows=np.asarray(rows, dtype=np.int64), ids=[str(ids[r]) for r in rows], y=y, groups=groups,
                   classes=list(labels.classes), multilabel=labels.multilabel, unlabeled=len(ids) - len(rows),
                   source=labels.source)


def _shown(labels: Labels, i: int) -> str:
    """A label's key as the user wrote it, roughly: relative to the CSV's folder when inside it."""
    key = labels.keys[i]
    if not labels.by_path:
        return key
    rel = os.path.relpath(key, os.path.dirname(os.path.abspath(labels.source)))
    return key if rel.startswith("..") else rel
