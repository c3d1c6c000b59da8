"""`protloc plot KIND INPUT... -o FILE`: pictures of what the other commands wrote."""

import os
import sys
from pathlib import Path

import click

from protloc import plot_data, plots
from protloc.cli.options import (architecture_options, channel_names, channel_options, common, dataset_normalization,
                                 device_option, view_from_flags)
from protloc.data import NORMALIZATIONS, ViewOptions
from protloc.embeddings import read_embeddings
from protloc.errors import ProtlocError
from protloc.output import atomic_path, check_destination

MAX_IMAGES = 16  # rows of an attention figure; more is unreadable


def _output_options(f):
    f = click.option("--force", is_flag=True, help="Overwrite an existing output file.")(f)
    f = click.option("--dpi", type=click.IntRange(min=10, max=1200), default=100,
                     help="Resolution: the picture is its size in inches (fixed per kind) x DPI pixels.")(f)
    f = click.option("--title", default=None, help="The figure's title (default: names its input).")(f)
    return click.option("-o", "--output", required=True, metavar="FILE",
                        help=f"The picture to write; its extension picks the format ({', '.join(plots.FORMATS)}).")(f)


def _format(output: str) -> str:
    fmt = Path(output).suffix.lower().lstrip(".")
    if fmt not in plots.FORMATS:
        raise click.BadParameter(f"{output}: the output must end in {', '.join('.' + f for f in plots.FORMATS)}",
                                 param_hint="'-o' / '--output'")
    return fmt


def _prepare(output: str, force: bool) -> str:
    """The output's format, checked with the destination and matplotlib before any slow work."""
    fmt = _format(output)
    check_destination(output, force)
    plots.require_matplotlib()
    return fmt


def _write(fig, output: str, fmt: str, dpi: int, quiet: bool) -> None:
    with atomic_path(output) as tmp:
        plots.save(fig, tmp, fmt, dpi)
    if not quiet:
        click.echo(f"protloc: wrote {output}", err=True)


@click.group("plot")
def plot_command():
    """Draw a picture (PNG, PDF or SVG) from what the other commands wrote. Needs matplotlib
    (pip install 'protloc[plot]').

    \b
    protloc plot training train.jsonl -o training.png
    protloc plot knn knn.json -o knn.png
    protloc plot confusion cv.json -o confusion.png
    protloc plot embedding emb.npz --labels labels.csv --method tsne -o map.png
    protloc plot embedding emb.h5ad --labels obs:label -o map.png
    protloc plot attention cell.tif --weights dino.pt -o attention.png
    protloc plot neighbours emb.npz --query cells/field_00003.tif -k 8 -o neighbours.png
    """


@plot_command.command("training")
@click.argument("logs", metavar="LOG.jsonl...", nargs=-1, required=True)
@_output_options
@common
def training_command(logs, output, dpi, title, force, quiet):
    """Pretraining curves from `protloc pretrain --log` files: loss, learning rate, teacher
    temperature and entropy, images/s over steps. Several logs are drawn together."""
    fmt = _prepare(output, force)
    runs = [(Path(p).stem, plot_data.read_training_log(p)) for p in logs]
    _write(plots.training_figure(runs, title or ", ".join(logs)), output, fmt, dpi, quiet)


@plot_command.command("knn")
@click.argument("results", metavar="RESULT.json...", nargs=-1, required=True)
@_output_options
@common
def knn_command(results, output, dpi, title, force, quiet):
    """k-NN macro F1 against k (mean ± std over folds) from `protloc knn --json` files: one line
    per embeddings file, so random-init and pretrained (or channel strategies) compare at a glance."""
    fmt = _prepare(output, force)
    _write(plots.knn_figure(plot_data.read_knn_curves(results), title or "weighted k-NN"), output, fmt, dpi, quiet)


@plot_command.command("confusion")
@click.argument("result", metavar="RESULT.json")
@_output_options
@common
def confusion_command(result, output, dpi, title, force, quiet):
    """The confusion matrix and per-class F1 of a `protloc finetune --json` file (pooled
    out-of-fold predictions; `knn --json` records no predictions, so it has none)."""
    fmt = _prepare(output, force)
    _write(plots.confusion_figure(plot_data.read_confusion(result), title or result), output, fmt, dpi, quiet)


@plot_command.command("embedding")
@click.argument("emb", metavar="EMB")
@click.option("--labels", "labels_path", metavar="CSV|obs:COLUMN",
              help="Labels CSV, or obs:COLUMN (a per-row column of EMB), to colour the rows by (default: one colour).")
@click.option("--ids", "ids_path", metavar="FILE", help="Row ids of an .npy EMB (from `protloc embed --ids`).")
@click.option("--id-column", default=None, help="Labels column matched to the row ids. Default: path, else id.")
@click.option("--label-column", default="label", help="Labels column holding the class(es).")
@click.option("--method", type=click.Choice(plot_data.METHODS), default="pca",
              help="pca: linear, fast, axes mean something; tsne: t-SNE (scikit-learn), local neighbourhoods, "
                   "slower (about a minute for 10,000 rows).")
@click.option("--seed", type=int, default=0, help="Seed of the projection.")
@_output_options
@common
def embedding_command(emb, labels_path, ids_path, id_column, label_column, method, seed, output, dpi, title,
                      force, quiet):
    """A 2-D map (PCA or t-SNE of the L2-normalized rows) of an embeddings file, coloured by label."""
    fmt = _prepare(output, force)
    embeddings = read_embeddings(emb, ids_path, stdin=sys.stdin.buffer if emb == "-" else None)
    labels = plot_data.row_labels(embeddings, labels_path, id_column, label_column) if labels_path else None
    xy, axes = plot_data.project_2d(embeddings.x, method, seed)
    fig = plots.embedding_figure(xy, labels, axes, title or f"{embeddings.source}: {len(xy)} rows, {method}")
    _write(fig, output, fmt, dpi, quiet)


@plot_command.command("attention")
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True)
@click.option("--weights", required=True, metavar="CKPT|random",
              help="The backbone: a protloc checkpoint, a foreign one, or 'random' from "
                   "--arch/--patch/--layout/--depth.")
@architecture_options("a random backbone")
@channel_options()
@click.option("--channels", callback=channel_names, metavar="NAMES",
              help="Comma-separated channel names in file order, or a selection of named channels. Default: as stored.")
@click.option("--size", type=click.IntRange(min=0), default=None,
              help="Resize each image to SIZE x SIZE first (as embed --size; 0: native size). Default: the model's "
                   "(recorded in its checkpoint), else native size.")
@click.option("--normalize", type=click.Choice(NORMALIZATIONS), default=None,
              help="How images are normalized for the model (as embed --normalize). Default: the model's.")
@click.option("--seed", type=int, default=0, help="Seed of a random backbone and of --channel-strategy random.")
@device_option
@_output_options
@common
def attention_command(images, weights, arch, patch, layout, depth, channel_strategy, fill, model_channels, channels,
                      size, normalize, seed, device, output, dpi, title, force, quiet):
    """DINO's picture: the last block's CLS attention over the patches, one panel per head (and
    their mean), over each image's channels.

    IMAGE: TIFF files, directories or - (paths on stdin); at most 16 images, one row each."""
    from protloc.attention_maps import attention_maps
    from protloc.device import resolve_device
    from protloc.embed import load_backbone
    from protloc.sources import discover

    fmt = _prepare(output, force)
    sources = discover(list(images))
    if len(sources) > MAX_IMAGES:
        raise ProtlocError(f"{images[0]}: {len(sources)} images; an attention figure takes at most "
                           f"{MAX_IMAGES} (one row each)")
    ctx = click.get_current_context()
    opts = view_from_flags(ctx)  # what reading images takes before the model (a random one probes their channels)
    model, _ = load_backbone(weights, sources, opts, arch=arch, patch=int(patch), layout=layout, depth=depth,
                             seed=seed, model_channels=model_channels)
    opts = view_from_flags(ctx, ViewOptions.from_record({}, weights, model.config))  # unset: as the model records
    opts = dataset_normalization(opts, weights, sources, 0, "fail", quiet)
    maps = attention_maps(model, sources, opts, resolve_device(device))
    c = model.config
    name = "random init" if weights == "random" else os.path.basename(weights)
    fig = plots.attention_figure(
        maps, title or f"CLS attention of the last block: {name} ({c.arch}/{c.patch}, {c.depth} blocks)")
    _write(fig, output, fmt, dpi, quiet)


@plot_command.command("neighbours")
@click.argument("emb", metavar="EMB")
@click.option("--query", required=True, metavar="ID",
              help="The query row: its id as stored (see `protloc embed --ids`) or the path of its image.")
@click.option("-k", "k", type=click.IntRange(min=1, max=50), default=8, help="Neighbours to show.")
@click.option("--labels", "labels_path", metavar="CSV|obs:COLUMN",
              help="Labels CSV, or obs:COLUMN (a per-row column of EMB): caption each image with its label.")
@click.option("--ids", "ids_path", metavar="FILE", help="Row ids of an .npy EMB (from `protloc embed --ids`).")
@click.option("--id-column", default=None, help="Labels column matched to the row ids. Default: path, else id.")
@click.option("--label-column", default="label", help="Labels column holding the class(es).")
@_output_options
@common
def neighbours_command(emb, query, k, labels_path, ids_path, id_column, label_column, output, dpi, title, force, quiet):
    """A montage: the query image and its k nearest rows by cosine similarity, re-read from the
    paths in the ids (relative to where `protloc embed` ran) and shown as channel composites."""
    fmt = _prepare(output, force)
    embeddings = read_embeddings(emb, ids_path, stdin=sys.stdin.buffer if emb == "-" else None)
    row = plot_data.find_row(embeddings, query)
    labels = plot_data.row_labels(embeddings, labels_path, id_column, label_column) if labels_path else None
    rows, sims = plot_data.nearest(embeddings.x, row, k)
    panels = []
    for r, caption in [(row, "query")] + [(r, f"cosine {s:.4f}") for r, s in zip(rows, sims)]:
        pixels, names = plot_data.read_view(embeddings, r)
        label = f"\n{labels[r] or 'unlabelled'}" if labels else ""
        panels.append((pixels, names, f"{caption}{label}\n{plots.short_name(embeddings.ids[r])}"))
    fig = plots.neighbours_figure(panels, title or f"nearest neighbours (cosine) in {embeddings.source}")
    _write(fig, output, fmt, dpi, quiet)
