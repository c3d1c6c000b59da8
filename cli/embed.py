"""`protloc embed`: images -> embeddings (.npy on stdout by default), ids beside."""

import os
import sys
import time

import click
from tqdm import tqdm

from protloc import distributed
from protloc.cells import image_sources
from protloc.cli.options import (architecture_options, cell_options, channel_options, check_views, common, data_options,
                                 dataset_normalization, device_option, show_progress, view_from_flags, view_options)
from protloc.data import ViewOptions
from protloc.embed import EmbedStats, embed, load_backbone, run_meta
from protloc.errors import ProtlocError
from protloc.embeddings import EXTENSIONS, RowWriter, check_output, format_of, write_embeddings, write_ids
from protloc.output import check_destination
from protloc.row_meta import check_source_meta, row_columns
from protloc.shard import gather_to_main, my_slice
from protloc.sources import discover


def _check_output(output: str) -> None:
    if output != "-" and format_of(output) is None:
        raise click.BadParameter(f"{output}: the output must end in {', '.join(EXTENSIONS)} (or be - for stdout)",
                                 param_hint="'-o' / '--output'")
    check_output(output)  # its format's library


@click.command("embed")
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", default="-", metavar="-|FILE.npy|FILE.npz|FILE.h5ad|FILE.zarr",
              help="Where the embeddings go: - = .npy on stdout (refused on a terminal); .npz also holds ids, meta and "
                   "per-row columns; .h5ad / .zarr: AnnData (X, obs, uns['protloc']) for scanpy.")
@click.option("--ids", "ids_path", metavar="FILE",
              help="Write the row ids (one line per row: the image path, or the group stem) to FILE.")
@click.option("--weights", required=True, metavar="CKPT|random",
              help="A protloc checkpoint, a foreign one (DINO, DINO4Cells, timm-style ViT; .pth or .safetensors), or "
                   "'random' for a random-init baseline built from --arch/--patch/--layout.")
@architecture_options("a random backbone")
@view_options()
@cell_options()
@channel_options()
@click.option("--batch-size", type=click.IntRange(min=1), default=32,
              help="Images (tiles with --tile, cells with --cells) per forward pass.")
@click.option("--seed", type=int, default=0, help="Seed of a random backbone and of --channel-strategy random.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@data_options
@device_option
@common
@click.pass_context
def embed_command(ctx, data, output, ids_path, weights, arch, patch, layout, depth, size, normalize, pool, tile, stride,
                  aggregate, cells, cell_size, mask_outside, border, channel_strategy, fill, model_channels,
                  batch_size, workers, on_error, seed, force, channels, channel_suffixes, z, axes, series, max_pixels,
                  device, quiet):
    """Embed images: one vector per image (or per tile or cell), rows in input order.

    DATA: TIFF files, directories (searched recursively, sorted) and - (paths on stdin, one per line).

    \b
    protloc embed images/ --weights random --arch vit_tiny --patch 8 --size 64 > emb.npy
    find plate1 -name '*.tif' | protloc embed - --weights model.pt -o emb.npz
    protloc embed fields/ --weights model.pt --tile 256 --aggregate mean -o emb.npz
    protloc embed fields/ --weights model.pt --cells fields/masks --cell-size 96 -o cells.npz
    protloc embed fields/ --weights model.pt --cells fields/masks -o cells.h5ad
    """
    _check_output(output)
    check_views(tile, stride, aggregate, cells, cell_size, mask_outside, border)
    if output == "-" and sys.stdout.isatty():
        raise ProtlocError("refusing to write binary .npy to a terminal: redirect stdout or use -o FILE")
    for path in ([output] if output != "-" else []) + ([ids_path] if ids_path else []):
        check_destination(path, force)

    opts = view_from_flags(ctx)  # what reading images takes before the model (a random one probes their channels)
    sources = discover(list(data), stdin=sys.stdin if "-" in data else None, channel_suffixes=channel_suffixes)
    if cells:
        sources = image_sources(sources, cells)
    check_source_meta(sources)
    model, model_meta = load_backbone(weights, sources, opts, arch=arch, patch=int(patch), layout=layout,
                                      depth=depth, seed=seed, model_channels=model_channels, on_error=on_error)
    opts = view_from_flags(ctx, ViewOptions.from_record({}, weights, model.config))  # unset: as the model records
    world = distributed.init(device)  # under torchrun: this rank embeds its contiguous share
    try:
        opts = dataset_normalization(opts, weights, sources, workers, on_error, quiet or not world.is_main)
        writer, stats, ids, elapsed = _embed_share(ctx, world, model, sources, opts, output, batch_size, workers,
                                                   on_error)
    finally:
        distributed.close(world)
    if not world.is_main:
        return
    if writer is None:
        raise ProtlocError(f"no image could be embedded ({len(stats.skipped)} skipped)")
    if stats.channel_maps and not quiet:
        for plan in sorted(stats.channel_maps):
            click.echo(f"protloc: channels ({opts.channel_strategy}): {plan}", err=True)

    meta = run_meta(model_meta, opts, model.config, stats)
    obs = row_columns(ids, sources, stats.view_meta if (tile or cells) and not aggregate else None)
    write_embeddings(output, writer, ids, meta, obs, stdout=sys.stdout.buffer)
    writer.close()
    if ids_path:
        write_ids(ids_path, ids)

    if not quiet:
        ranks = f" on {world.size} processes" if world.size > 1 else ""
        views = f" as {stats.views} tile(s)" if tile else f" as {stats.views} cell(s)" if cells else ""
        click.echo(f"protloc: embedded {stats.images} image(s){views} -> ({writer.rows}, {writer.dim}) "
                   f"in {elapsed:.1f} s ({stats.images / elapsed:.1f} img/s, "
                   f"{stats.data_wait_s / elapsed:.0%} waiting for data)"
                   + (f"; skipped {len(stats.skipped)}" if stats.skipped else "") + ranks, err=True)


def _embed_share(ctx, world, model, sources, opts, output, batch_size, workers, on_error):
    """Embed this rank's share of the sources; on rank 0, every rank's rows in input order.

    Returns (writer or None, stats, ids, seconds): the merged results on rank 0."""
    start = time.perf_counter()
    stats = EmbedStats()
    writer = None  # its width is known with the first batch: D, or D x C with --channel-strategy per-channel
    ids: list[str] = []
    share = sources[my_slice(len(sources), world)]
    tmp_dir = os.path.dirname(os.path.abspath(output)) if output != "-" else None
    with tqdm(total=len(share), unit="img", disable=not (world.is_main and show_progress(ctx)), file=sys.stderr) as bar:
        for batch_ids, vectors in embed(model, share, opts, batch_size=batch_size, device=world.device,
                                        workers=workers, on_error=on_error, stats=stats, progress=bar.update):
            if writer is None:
                writer = RowWriter(vectors.shape[1], tmp_dir=tmp_dir)
            writer.append(vectors)
            ids.extend(batch_ids)
    writer, infos = gather_to_main(world, writer, {"ids": ids, "stats": stats})
    if infos:  # rank 0: the others' after its own, in rank order
        ids = [i for part in infos for i in part["ids"]]
        stats = EmbedStats.merge([part["stats"] for part in infos])
    return writer, stats, ids, time.perf_counter() - start
