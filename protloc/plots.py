"""Figures for `protloc plot`: training curves, k-NN F1, confusion matrices, embedding maps,
attention maps and nearest-neighbour montages, each a matplotlib Figure built from plain data.

matplotlib is an optional extra (`pip install 'protloc[plot]'`), imported on first use. Figures
are made with `matplotlib.figure.Figure` rather than pyplot: no GUI backend is ever picked (so
it works headless, as Agg, on any cluster node), no global figure registry fills up, and a
Jupyter session importing protloc keeps its own backend. Sizes are fixed in inches, so a PNG
is exactly `figsize x dpi` pixels.
"""

from __future__ import annotations

import numpy as np

from protloc.errors import ProtlocError

FORMATS = ("png", "pdf", "svg")
# Fluorescence display convention (as HPA's): protein green, nucleus blue, microtubules red, ER yellow.
CHANNEL_COLOURS = {"protein": (0.1, 1.0, 0.1), "nucleus": (0.2, 0.4, 1.0), "microtubules": (1.0, 0.15, 0.15),
                   "er": (1.0, 0.85, 0.0)}
OTHER_COLOURS = [(1.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 0.5, 0.0), (0.7, 0.7, 0.7)]


def require_matplotlib() -> None:
    """Fail early, before any slow work, when the `plot` extra is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ProtlocError("plots need matplotlib, which is not installed: pip install 'protloc[plot]'") from None


def figure(width: float, height: float):
    """An empty Figure (constrained layout) of width x height inches."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save(fig, path, fmt: str = "png", dpi: int = 100) -> None:
    """Write `fig` to `path` as `fmt` (given apart from the path, which may be a temporary name)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    fig.savefig(path, format=fmt, dpi=dpi)


def composite(pixels: np.ndarray, names: list[str]) -> np.ndarray:
    """(C, H, W) channels -> (H, W, 3) RGB in 0..1: each channel stretched over its 1-99.8th
    percentiles and added in its colour (unknown names get magenta, cyan, ...)."""
    pixels = np.asarray(pixels, dtype=np.float32)
    rgb = np.zeros(pixels.shape[1:] + (3,), np.float32)
    others = iter(OTHER_COLOURS * len(names))
    for channel, name in zip(pixels, names):
        lo, hi = np.percentile(channel, (1.0, 99.8))
        unit = np.clip((channel - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb += unit[..., None] * np.array(CHANNEL_COLOURS.get(name) or next(others), np.float32)
    return np.clip(rgb, 0, 1)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Running mean over `window` steps (shorter at the start), NaNs ignored."""
    valid = np.isfinite(y)
    sums = np.cumsum(np.where(valid, y, 0.0))
    counts = np.cumsum(valid)
    start = np.maximum(np.arange(len(y)) - window, -1)
    total = sums - np.where(start >= 0, sums[start.clip(0)], 0.0)
    n = counts - np.where(start >= 0, counts[start.clip(0)], 0)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def training_figure(logs: list[tuple[str, dict[str, np.ndarray]]], title: str = ""):
    """2 x 2 panels over steps: loss (raw and running mean), learning rate, teacher temperature
    with the teacher's entropy, images/s. One colour per (name, log) run."""
    fig = figure(10, 7)
    (ax_loss, ax_lr), (ax_temp, ax_speed) = fig.subplots(2, 2, sharex=True)
    ax_entropy = ax_temp.twinx()
    for i, (name, log) in enumerate(logs):
        colour, step = f"C{i}", log["step"]
        if "loss" in log:
            ax_loss.plot(step, log["loss"], color=colour, alpha=0.25, lw=0.8)
            ax_loss.plot(step, _smooth(log["loss"], max(1, len(step) // 50)), color=colour, label=name)
        if "lr" in log:
            ax_lr.plot(step, log["lr"], color=colour, label=name)
        if "teacher_temp" in log:
            ax_temp.plot(step, log["teacher_temp"], color=colour, label=f"{name}: temperature")
        if "teacher_entropy" in log:
            ax_entropy.plot(step, log["teacher_entropy"], color=colour, ls="--", label=f"{name}: entropy")
        if "images_per_s" in log:
            ax_speed.plot(step, log["images_per_s"], color=colour, alpha=0.3, lw=0.8)
            ax_speed.plot(step, _smooth(log["images_per_s"], max(1, len(step) // 50)), color=colour, label=name)
    ax_loss.set(title="DINO loss", ylabel="cross-entropy")
    ax_lr.set(title="learning rate", ylabel="lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_temp.set(title="teacher temperature (solid) and teacher entropy (dashed)", ylabel="temperature")
    ax_entropy.set_ylabel("entropy of the teacher's outputs (nats)")
    ax_speed.set(title="throughput", ylabel="images / s")
    for ax in (ax_temp, ax_speed):
        ax.set_xlabel("step")
    if len(logs) > 1:
        ax_loss.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def knn_figure(curves, title: str = "weighted k-NN"):
    """Macro F1 against k (log axis), mean +- std over folds as a band, one line per curve."""
    fig = figure(7, 4.5)
    ax = fig.subplots()
    for i, c in enumerate(curves):
        ax.plot(c.k, c.mean, "o-", color=f"C{i}", label=c.name)
        ax.fill_between(c.k, c.mean - c.std, c.mean + c.std, color=f"C{i}", alpha=0.2, lw=0)
    ks = sorted({int(k) for c in curves for k in c.k})
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    protocols = sorted({c.protocol for c in curves if c.protocol})
    ax.set(xlabel="k (neighbours)", ylabel="macro F1 (mean ± std over folds)",
           title=title + (f" ({'; '.join(protocols)})" if protocols else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def confusion_figure(conf, title: str = ""):
    """The confusion matrix, row-normalized with the counts written in, beside per-class F1 bars.
    Multi-label: per class, the counts of true positives, false negatives and false positives
    (coloured as a share of the class's true labels)."""
    n = len(conf.classes)
    side = max(4.0, 0.45 * n + 2)
    fig = figure(side * 1.9, side + 0.8)  # the height holds the rotated class names under the matrix
    ax_m, ax_f1 = fig.subplots(1, 2, width_ratios=[1.15, 1])
    if conf.multilabel:
        counts = np.stack([conf.matrix[:, 1, 1], conf.matrix[:, 1, 0], conf.matrix[:, 0, 1]], 1)  # tp, fn, fp
        share = counts / np.maximum(counts[:, :2].sum(1, keepdims=True), 1)
        columns, xlabel, ylabel = ["true pos.", "false neg.", "false pos."], "", "class"
    else:
        counts = conf.matrix
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        columns, xlabel, ylabel = conf.classes, "predicted class", "true class"
    image = ax_m.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fontsize = 8 if n <= 12 else 6
    for (i, j), v in np.ndenumerate(counts):
        if v:
            ax_m.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=fontsize,
                      color="white" if share[i, j] > 0.5 else "black")
    ax_m.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=fontsize + 1)
    ax_m.set_yticks(range(n), conf.classes, fontsize=fontsize + 1)
    ax_m.set(xlabel=xlabel, ylabel=ylabel, title="confusion (share of each true class; counts)")
    fig.colorbar(image, ax=ax_m, shrink=0.8)
    ax_f1.barh(range(n), conf.per_class_f1, color="C0")
    ax_f1.set_yticks(range(n), conf.classes, fontsize=fontsize + 1)
    ax_f1.invert_yaxis()  # classes top to bottom, as in the matrix
    mean, std, runs = conf.macro_f1
    ax_f1.axvline(mean, color="C3", ls="--",
                  label=f"macro F1 {mean:.3f} ± {std:.3f} ({runs} seed{'s' if runs != 1 else ''})")
    ax_f1.set(xlim=(0, 1), xlabel="F1 (pooled out-of-fold predictions)", title="per-class F1")
    ax_f1.legend(loc="lower right", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def embedding_figure(xy: np.ndarray, labels: list[str | None] | None, axis_names: list[str], title: str = ""):
    """A 2-D map of the rows, coloured by label (unlabelled rows grey, beneath)."""
    fig = figure(9, 6.5)
    ax = fig.subplots()
    size = float(np.clip(3000 / max(len(xy), 1), 3, 30))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, color="C0", lw=0)
    else:
        labels = np.array([lab if lab is not None else "" for lab in labels], dtype=object)
        if (labels == "").any():
            ax.scatter(*xy[labels == ""].T, s=size, color="0.8", lw=0, label="unlabelled")
        classes = sorted(set(labels) - {""})
        palette = _palette(len(classes))
        for colour, name in zip(palette, classes):
            ax.scatter(*xy[labels == name].T, s=size, color=colour, lw=0, label=name)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", markerscale=max(1, 30 / size) ** 0.5,
                  frameon=False)
    ax.set(xlabel=axis_names[0], ylabel=axis_names[1], title=title)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _palette(n: int) -> list:
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["gist_ncar"](i / n) for i in range(n)]


def attention_figure(maps, title: str = ""):
    """One row per image: its channels as a composite, then the CLS attention of each head (and
    their mean) over the image, darkened, patch by patch."""
    heads = maps[0].maps.shape[0]
    cols = heads + 2
    fig = figure(1.9 * cols, 2.0 * len(maps) + (0.4 if title else 0.1))
    axes = np.asarray(fig.subplots(len(maps), cols, squeeze=False))
    for row, m in zip(axes, maps):
        rgb = composite(m.pixels, m.channel_names)
        height, width = m.maps.shape[1] * m.patch, m.maps.shape[2] * m.patch  # the area the patches cover
        row[0].imshow(rgb)
        row[0].set_title(f"{short_name(m.id)}\n{'+'.join(m.channel_names)}", fontsize=7)
        for j, (ax, attn) in enumerate(zip(row[1:], list(m.maps) + [m.maps.mean(0)])):
            ax.imshow(rgb * 0.6)
            ax.imshow(attn / max(attn.max(), 1e-12), cmap="inferno", alpha=0.65, vmin=0, vmax=1,
                      interpolation="nearest", extent=(0, width, height, 0))
            ax.set_xlim(0, rgb.shape[1])
            ax.set_ylim(rgb.shape[0], 0)
            ax.set_title(f"head {j + 1}" if j < heads else "mean of heads", fontsize=8)
        for ax in row:
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def neighbours_figure(panels: list[tuple[np.ndarray, list[str], str]], title: str = ""):
    """A montage, left to right: the query, then its neighbours; each panel is (pixels (C, H, W),
    channel names, caption)."""
    fig = figure(1.8 * len(panels), 2.5 + (0.3 if title else 0))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for i, (ax, (pixels, names, caption)) in enumerate(zip(axes, panels)):
        ax.imshow(composite(pixels, names))
        ax.set_title(caption, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            for spine in ax.spines.values():
                spine.set(color="C3", lw=2.5)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def short_name(path: str, width: int = 24) -> str:
    name = path.rsplit("/", 1)[-1]
    return name if len(name) <= width else "…" + name[-width + 1:]
