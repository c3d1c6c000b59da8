"""`protloc predict`: localization predictions of a MODEL from `protloc finetune`, as TSV or AnnData."""

import contextlib
import os
import shutil
import sys
import tempfile
import time

import click
import numpy as np
from tqdm import tqdm

from protloc.cells import image_sources
from protloc import emb_anndata, predictions
from protloc.classifier import check_embeddings_backbone, load_classifier, prediction_view, tsv_header, tsv_rows
from protloc.cli.options import (cell_options, channel_options, check_views, common, data_options,
                                 dataset_normalization, device_option, show_progress, view_flags, view_options)
from protloc.device import resolve_device
from protloc.embed import EmbedStats, embed, run_meta
from protloc.embeddings import RowWriter, format_of, is_embeddings, read_embeddings
from protloc.errors import ProtlocError
from protloc.output import atomic_path, check_destination
from protloc.row_meta import check_source_meta, row_columns
from protloc.sources import discover

@contextlib.contextmanager
def _open_output(output: str):
    """FILE written atomically, or stdout written when complete (rows wait in an anonymous
    temporary file): an error or a signal leaves nothing half-written."""
    if output == "-":
        with tempfile.TemporaryFile("w+") as tmp:
            yield tmp
            tmp.seek(0)
            shutil.copyfileobj(tmp, sys.stdout)
        return
    with atomic_path(output) as tmp, open(tmp, "w") as f:
        yield f


@click.command("predict")
@click.argument("data", metavar="DATA...|EMB", nargs=-1, required=True)
@click.option("--weights", required=True, metavar="MODEL", help="A classifier written by `protloc finetune -o`.")
@click.option("-o", "--output", default="-", metavar="-|FILE|FILE.h5ad|FILE.zarr",
              help="Where the predictions go: - = TSV on stdout; a FILE is a TSV, a .h5ad / .zarr AnnData (the "
                   "embeddings as X, `predicted` in obs, obsm['probabilities']); written when complete.")
@click.option("--backbone", "backbone_path", metavar="CKPT", default=None,
              help="For a head trained on an embeddings file: the backbone that made them (its SHA-256 must match). "
                   "Default: the path stored in MODEL.")
@view_options(inherit="the MODEL")
@cell_options(inherit="the MODEL")
@channel_options(inherit="the MODEL")
@click.option("--batch-size", type=click.IntRange(min=1), default=32,
              help="Images (tiles with --tile, cells with --cells) per forward pass.")
@click.option("--ids", "ids_path", metavar="FILE", help="Row ids of an .npy EMB input.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@data_options
@device_option
@common
@click.pass_context
def predict_command(ctx, data, weights, output, backbone_path, size, normalize, pool, tile, stride, aggregate,
                    cells, cell_size, mask_outside, border, channel_strategy, fill, model_channels, batch_size,
                    ids_path, force, channels, channel_suffixes, z, axes, series, max_pixels, workers, on_error,
                    device, quiet):
    """Predict localizations: a TSV with id, predicted class(es) (a;b for multi-label) and one
    probability column per class, or AnnData (-o FILE.h5ad / .zarr: the embeddings with the
    predictions in obs and obsm); rows in input order, one per image (per tile with --tile, per
    cell with --cells).

    DATA: TIFF files, OME-Zarr, CSV manifests, directories and - (paths on stdin), viewed as the MODEL
    was trained (size, normalization, pooling, tiles, cell crops, channels; any flag overrides; the
    masks of --cells belong to the data and are never inherited); or EMB: an embeddings file made
    with the MODEL's backbone.

    \b
    protloc predict plate1/ --weights model.pt > predictions.tsv
    protloc predict fields/ --weights model.pt --tile 256 --aggregate mean -o fields.tsv
    protloc predict fields/ --weights cells.pt --cells fields/masks > cells.tsv
    protloc predict emb.h5ad --weights head.pt -o predicted.h5ad
    """
    anndata_out = output != "-" and format_of(output) is emb_anndata
    if anndata_out:
        emb_anndata.require(output)
    if output != "-":
        check_destination(output, force)
    clf = load_classifier(weights)
    start = time.perf_counter()
    if is_embeddings(data):
        emb = read_embeddings(data[0], ids_path, need_ids=True)
        check_embeddings_backbone(clf, emb.meta, emb.source)
        probs = clf.probabilities(emb.x)
        if anndata_out:
            predictions.write_anndata(output, emb.x, emb.ids, emb.meta, emb.obs or {}, clf, probs)
        else:
            with _open_output(output) as out:
                out.write(tsv_header(clf.classes))
                out.write(tsv_rows(emb.ids, clf.predicted(probs), probs))
        if not quiet:
            click.echo(f"protloc: predicted {len(emb.ids)} row(s) of {emb.source}", err=True)
        return

    model, opts, model_meta = prediction_view(clf, view_flags(ctx), backbone_path)
    check_views(opts.tile, opts.stride, opts.aggregate, cells, cell_size, mask_outside, border)
    sources = discover(list(data), stdin=sys.stdin if "-" in data else None, channel_suffixes=opts.channel_suffixes)
    if cells:
        sources = image_sources(sources, cells)
    if anndata_out:
        check_source_meta(sources)
    opts = dataset_normalization(opts, weights, sources, workers, on_error, quiet)
    stats, all_ids, all_probs = EmbedStats(), [], []
    writer = None  # the embeddings, for an AnnData output
    with (contextlib.nullcontext() if anndata_out else _open_output(output)) as out, \
            tqdm(total=len(sources), unit="img", disable=not show_progress(ctx), file=sys.stderr) as bar:
        if out is not None:
            out.write(tsv_header(clf.classes))
        for ids, vectors in embed(model, sources, opts, batch_size=batch_size, device=resolve_device(device),
                                  workers=workers, on_error=on_error, stats=stats, progress=bar.update):
            probs = clf.probabilities(vectors)
            if out is not None:
                out.write(tsv_rows(ids, clf.predicted(probs), probs))
            else:
                writer = writer or RowWriter(vectors.shape[1], tmp_dir=os.path.dirname(os.path.abspath(output)))
                writer.append(vectors)
                all_probs.append(probs)
            all_ids.extend(ids)
        if not all_ids:
            raise ProtlocError(f"no image could be read ({len(stats.skipped)} skipped)")
    rows = len(all_ids)
    if anndata_out:
        views = stats.view_meta if (opts.tile or opts.cells) and not opts.aggregate else None
        predictions.write_anndata(output, writer, all_ids, run_meta(model_meta, opts, model.config, stats),
                                  row_columns(all_ids, sources, views), clf, np.concatenate(all_probs))
        writer.close()
    if not quiet:
        elapsed = time.perf_counter() - start
        click.echo(f"protloc: predicted {rows} row(s) of {stats.images} image(s) with {os.path.basename(weights)} "
                   f"in {elapsed:.1f} s" + (f"; skipped {len(stats.skipped)}" if stats.skipped else ""), err=True)
