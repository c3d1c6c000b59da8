"""Options shared by several commands, declared once."""

import dataclasses
import logging
import os
import sys

import click
from click.core import ParameterSource

from protloc.channel_map import STRATEGIES, parse_fill
from protloc.cells import BORDERS
from protloc.channels import parse_names
from protloc.data import NORMALIZATIONS, ViewOptions
from protloc.dataset_stats import with_dataset_stats
from protloc.embed import POOLINGS
from protloc.errors import ProtlocError
from protloc.model import ARCHS, LAYOUTS, PATCHES, ViTConfig
from protloc.tiles import AGGREGATIONS
from protloc.tiff import DEFAULT_MAX_PIXELS, Z_PROJECTIONS


def _set_debug(ctx, _param, value):
    ctx.meta["protloc.debug"] = value
    return value


class _Once(logging.Filter):
    """A warning is printed once per run: an image re-read every epoch, or by two passes, warns once."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        if record.levelno != logging.WARNING:
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class _LineFormatter(logging.Formatter):
    """`protloc: warning: FILE: what` — one line per record, the level in lower case as in `protloc: error:`."""

    def format(self, record):
        message = " ".join(record.getMessage().split())  # a record never spans lines
        return f"protloc: {record.levelname.lower()}: {message}"


def _set_logging(ctx, _param, quiet):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter())
    handler.addFilter(_Once())
    root = logging.getLogger("protloc")
    root.handlers[:] = [handler]
    root.setLevel(logging.ERROR if quiet else logging.WARNING)
    root.propagate = False
    # tifffile's own records reach the user through the reader (protloc/tiff_messages.py), as errors or warnings
    ctx.meta["protloc.quiet"] = quiet
    return quiet


def common(f):
    """--quiet and --debug, on every command."""
    f = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                     help="Show the full traceback of an error.")(f)
    f = click.option("--quiet", "-q", is_flag=True, callback=_set_logging,
                     help="Print no progress or summary on stderr, only errors.")(f)
    return f


def channel_names(_ctx, param, value):
    """click callback of a NAMES option: comma-separated names -> list (protloc.channels.parse_names)."""
    try:
        return parse_names(value)
    except ProtlocError as e:
        raise click.BadParameter(str(e), param=param) from None


ZARR_LEVEL = "protloc.zarr_level"


def _set_zarr_level(ctx, _param, value):
    # kept in ctx.meta, not passed to the command: every command's reading takes it through view_flags/zarr_level
    if value is not None:
        ctx.meta[ZARR_LEVEL] = value


def zarr_level(ctx) -> int:
    """--zarr-level as given, else 0 (the full resolution)."""
    return ctx.meta.get(ZARR_LEVEL, 0)


def data_options(f):
    """How DATA arguments are read: channel names, one-file-per-channel groups, z, axes, series,
    OME-Zarr level, limits, decoding processes, and what a bad image does."""
    f = click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail",
                     help="A bad image stops the run (fail) or is reported on stderr and left out (skip).")(f)
    f = click.option("--workers", type=click.IntRange(min=0), default=min(4, os.cpu_count() or 1),
                     help="Processes decoding TIFFs ahead of the model (0: decode in the main process).")(f)
    f = click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS,
                     help="Refuse images that declare more pixels than this (guards memory).")(f)
    f = click.option("--series", type=click.IntRange(min=0), default=None, metavar="K",
                     help="Read series K (0, 1, ...: tifffile's series) of files that hold several images (OME "
                          "images, pyramids, shapes that differ; of a multi-file OME-TIFF set, the images with "
                          "planes in that file). Default: the one series; pages saved one by one as one stack; else "
                          "the first full-resolution series, with a warning naming the count.")(f)
    f = click.option("--zarr-level", type=click.IntRange(min=0), default=None, metavar="K", expose_value=False,
                     callback=_set_zarr_level,
                     help="Read resolution level K of OME-Zarr images (0, 1, ...: the multiscales' datasets, full "
                          "resolution first). Default: 0.")(f)
    f = click.option("--axes", default=None, metavar="AXES",
                     help="Override the axes of every file, e.g. ZCYX or YXC. Default: from OME, ImageJ, "
                          "Micro-Manager or tifffile axes metadata; without it, from the shape: Y, X are the one "
                          "adjacent pair of dimensions at least 4x larger than every other one (none or several: "
                          "an error asking for --axes); one other dimension is C (CYX or YXC; Z for RGB pages), "
                          "two before Y, X are CZ if the first is <= 4 < the second, else ZC, one before and one "
                          "after are ZYXC.")(f)
    f = click.option("--z", "z", type=click.Choice(Z_PROJECTIONS), default="max",
                     help="Projection of z-stacks over Z.")(f)
    f = click.option("--channel-suffixes", callback=lambda c, p, v: v.split(",") if v else None, metavar="A,B,..",
                     help="One file per channel: X_a.tif + X_b.tif make one image X; the suffixes name the "
                          "channels (blue,green,red,yellow = nucleus,protein,microtubules,er; gfp = protein).")(f)
    f = click.option("--channels", callback=channel_names, metavar="NAMES",
                     help="Comma-separated channel names: name the channels in file order, or select and "
                          "reorder channels of files that store names (OME). Default: as stored.")(f)
    return f


def label_options(f):
    """--labels CSV|obs:COLUMN and --groups obs:COLUMN: what knn and finetune score rows by."""
    f = click.option("--groups", "groups_spec", metavar="obs:COLUMN", default=None,
                     help="For an EMB: groups from one of its per-row columns instead of the labels CSV's group "
                          "column.")(f)
    return click.option("--labels", "labels_path", required=True, metavar="CSV|obs:COLUMN",
                        help="Labels CSV: path (relative to the CSV) or id, label (a;b = multi-label), optional group; "
                             "or, for an EMB, obs:COLUMN, one of its per-row columns (.h5ad obs, .npz): rows with an "
                             "empty value are unlabelled.")(f)


def view_options(inherit: str | None = None, size_help: str = "native size (images of one size batch together)"):
    """--size, --normalize, --pool, --tile, --stride, --aggregate: how each image becomes model
    inputs. With `inherit` (e.g. "the MODEL"), every default is the value recorded there; without,
    size, normalize and pool default to those the model records (protloc.embed.view_settings)."""
    def default(own, text):
        return (None, f"Default: as recorded in {inherit}.") if inherit else (own, text)

    def decorate(f):
        value, text = default(None, "")
        f = click.option("--aggregate", type=click.Choice(AGGREGATIONS), default=value,
                         help="With --tile or --cells: one row per image, the mean of its tile or cell vectors. "
                              + text)(f)
        f = click.option("--stride", type=click.IntRange(min=1), default=value, metavar="S",
                         help="Step between tiles. " + (text or "Default: the tile size (no overlap)."))(f)
        value, text = default(None, "Default: whole images.")
        f = click.option("--tile", type=click.IntRange(min=0 if inherit else 1), default=value, metavar="T",
                         help="Cut each image into T x T tiles (rows path#tile=K, row by row; a last row/column "
                              "flush with the border covers the rest); --size then resizes each tile. "
                              + ("0: whole images. " if inherit else "") + text)(f)
        recorded = (f"as recorded in {inherit}." if inherit else
                    "the model's (pretrain --embed-pool, recorded in its checkpoint); cls for a random or foreign one.")
        f = click.option("--pool", type=click.Choice(POOLINGS), default=None,
                         help="The CLS token, or the mean of the patch tokens. Default: " + recorded)(f)
        recorded = (f"as recorded in {inherit}." if inherit else
                    "the model's (recorded in its checkpoint); image for a random backbone.")
        f = click.option("--normalize", type=click.Choice(NORMALIZATIONS), default=None,
                         help="image: per-image per-channel mean 0 / std 1 (DINO4Cells); percentile: 1-99.8% to 0-1; "
                              "dataset: the data set's 1-99.8% per channel to 0-1, the same for every image (keeps "
                              "brightness differences between images; the statistics recorded with the model, else "
                              "estimated over these images from up to 256 of them, reported on stderr); imagenet: "
                              "percentile then ImageNet mean/std; none: raw values. Default: " + recorded)(f)
        recorded = (f"as recorded in {inherit}." if inherit else
                    f"the model's (pretrain --embed-size, recorded in its checkpoint), else {size_help}.")
        return click.option("--size", type=click.IntRange(min=0), default=None,
                            help="Resize each image (each tile with --tile) to SIZE x SIZE; 0: native size. Default: "
                                 + recorded)(f)
    return decorate


def channel_options(inherit: str | None = None):
    """--channel-strategy, --fill, --model-channels: how an image's channels fill a fused-layout
    model's input slots (protloc/channel_map.py). With `inherit`, defaults are recorded there."""
    def decorate(f):
        recorded = f" Default: as recorded in {inherit}." if inherit else ""
        f = click.option("--model-channels", callback=channel_names, metavar="NAMES",
                         help="Names of the model's input channels, in order: needed for foreign checkpoints with "
                              "other than 3 (r,g,b = microtubules,protein,nucleus) or 4 (DINO4Cells: "
                              "microtubules,protein,nucleus,er) channels; renames a protloc model's." + recorded)(f)
        f = click.option("--fill", default=None if inherit else "zero", metavar="zero|mean|copy:NAME",
                         callback=lambda c, p, v: parse_fill(v) if v else v,
                         help="What fills a model slot no image channel goes to (natural, random)." + recorded)(f)
        return click.option("--channel-strategy", type=click.Choice(STRATEGIES), default=None if inherit else "natural",
                            help="natural: each channel into the model slot of its name; replicate: channels cycled "
                                 "over the slots; random: into random slots (seeded by --seed, recorded); "
                                 "per-channel: each channel alone in every slot, vectors concatenated (D x C)."
                                 + recorded)(f)
    return decorate


def cell_options(inherit: str | None = None):
    """--cells, --cell-size, --mask-outside, --border: one view per segmented cell (protloc/cells.py).
    Their defaults are None (so check_views sees what was given); with `inherit`, the crop settings
    default to those recorded there (the masks never do: they belong to the data)."""
    def default(own):
        return f" Default: as recorded in {inherit}, else {own}." if inherit else f" Default: {own}."

    def decorate(f):
        f = click.option("--border", type=click.Choice(BORDERS), default=None,
                         help="A cell cut by the image border (its mask touches the border or its crop reaches past "
                              "it): skip it (no row), or pad its crop with zeros." + default("skip"))(f)
        f = click.option("--mask-outside/--keep-outside", default=None,
                         help="Set the crop's pixels outside the cell (background, neighbouring cells) to zero."
                              + default("keep them"))(f)
        f = click.option("--cell-size", type=click.IntRange(min=8), default=None, metavar="PX",
                         help="Side of the square crop centred on each cell's centroid (--size then resizes it)."
                              + default("128"))(f)
        return click.option("--cells", metavar="MASKS", default=None,
                            help="One row per cell (path#cell=K, ascending K) from label images (0 = background): "
                                 "MASKS is a folder holding the mask of image X as X.tif (or X_mask, X_masks, "
                                 "X_labels .tif/.tiff; Cellpose's X_cp_masks .tif/.tiff/.png or X_seg.npy; "
                                 "StarDist's X.stardist.tif), {dir} for those beside each image, or a pattern with "
                                 "{stem} and {dir}, e.g. '{dir}/{stem}_cp_masks.tif'. Crops keep their whole "
                                 "image's normalization."
                                 + (" Not recorded in a MODEL: give the masks of the data." if inherit else ""))(f)
    return decorate


# click parameter -> the ViewOptions field it sets
VIEW_FLAGS = {name: name for name in ("size", "normalize", "pool", "tile", "stride", "aggregate", "cells", "cell_size",
                                      "mask_outside", "border", "channels", "channel_suffixes", "z", "axes", "series",
                                      "max_pixels", "channel_strategy", "fill", "model_channels")}
VIEW_FLAGS["seed"] = "strategy_seed"


def view_flags(ctx) -> dict:
    """The ViewOptions fields set by the flags given on the command line (a flag left at its default
    sets nothing, so a recorded view keeps its own): the one place flags become a view. --size 0:
    the native size; --tile 0 (predict): whole images."""
    given = {field: ctx.params[flag] for flag, field in VIEW_FLAGS.items()
             if flag in ctx.params and ctx.get_parameter_source(flag) == ParameterSource.COMMANDLINE}
    for field in ("channels", "channel_suffixes", "model_channels"):
        if given.get(field) is not None:
            given[field] = tuple(given[field])
    if ZARR_LEVEL in ctx.meta:
        given["zarr_level"] = ctx.meta[ZARR_LEVEL]
    if given.get("size") == 0:
        given["size"] = None
    if given.get("tile") == 0:
        given.update(tile=None, stride=None, aggregate=None)
    return given


def view_from_flags(ctx, base: ViewOptions = ViewOptions()) -> ViewOptions:
    """`base` (the view a model records: ViewOptions.from_record) with the flags given instead."""
    return dataclasses.replace(base, **view_flags(ctx))


def dataset_normalization(opts, where: str, sources, workers: int, on_error: str, quiet: bool):
    """`opts` with the data set's statistics for normalize "dataset" (protloc.dataset_stats: those
    it holds, recorded in `where`, else estimated over `sources` and reported on stderr in one line
    unless `quiet`)."""
    opts, estimated = with_dataset_stats(opts, None, where, sources, workers, on_error)
    if estimated is not None and not quiet:
        click.echo(f"protloc: {estimated.describe()}", err=True)
    return opts


def check_views(tile, stride, aggregate, cells=None, cell_size=None, mask_outside=None, border=None) -> None:
    """Tiles and cells are two kinds of views: one at a time, each with its own flags."""
    if tile and cells:
        raise click.UsageError("--tile and --cells are two kinds of views: give one")
    if not tile and stride is not None:
        raise click.UsageError("--stride goes with --tile")
    if not (tile or cells) and aggregate is not None:
        raise click.UsageError("--aggregate goes with --tile or --cells")
    if not cells and (cell_size is not None or mask_outside is not None or border is not None):
        raise click.UsageError("--cell-size, --mask-outside/--keep-outside and --border go with --cells")


def architecture_options(of: str, recipe_default=None):
    """--arch, --patch, --layout, --depth of a new backbone; `of` names it in the help. With
    `recipe_default` (a setting's name -> help text), a flag left out takes a recipe's value
    (its click default is None)."""
    def default(name, own, text):
        return (None, recipe_default(name)) if recipe_default else (own, text)

    def decorate(f):
        value, text = default("depth", ViTConfig.depth, f" DINO's ViTs have {ViTConfig.depth}.")
        f = click.option("--depth", type=click.IntRange(min=1), default=value,
                         help=f"Transformer blocks of {of}.{text}")(f)
        value, text = default("layout", ViTConfig.layout, "")
        f = click.option("--layout", type=click.Choice(LAYOUTS), default=value,
                         help=f"Token layout of {of}: one token per patch from all channels (fused), "
                              f"or one per channel and patch (channel).{text}")(f)
        value, text = default("patch", ViTConfig.patch, "")
        f = click.option("--patch", type=click.Choice(PATCHES), default=value,
                         help=f"Patch size of {of}.{text}")(f)
        value, text = default("arch", ViTConfig.arch, "")
        return click.option("--arch", type=click.Choice(list(ARCHS)), default=value,
                            help=f"Architecture of {of}.{text}")(f)
    return decorate


def device_option(f):
    return click.option("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                        help="Where the model runs; auto = the GPU when there is one.")(f)


def show_progress(ctx) -> bool:
    """Progress bars only for a person watching a terminal."""
    return not ctx.meta.get("protloc.quiet") and sys.stderr.isatty()
