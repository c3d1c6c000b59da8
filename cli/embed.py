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
from protloc.data import ViewOptions, model_view
from protloc.embed import EmbedStats, embed, load_backbone, run_meta
from protloc.embed_resume import CHUNK_IMAGES, ChunkStore, embed_resumable, work_folder
from protloc.errors import ProtlocError
from protloc.embeddings import EXTENSIONS, RowWriter, check_output, format_of, write_embeddings, write_ids
from protloc.output import check_destination
from protloc.row_meta import check_source_meta, row_columns
from protloc.shard import gather_to_main, my_slice, part_slice
from protloc.sources import discover, inputs_digest


def _shard(_ctx, param, value):
    """I/N -> (I, N), 1 <= I <= N."""
    if value is None:
        return None
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected I/N, e.g. 3/8", param=param) from None
    if not 1 <= index <= count:
        raise click.BadParameter(f"{value!r}: expected 1 <= I <= N", param=param)
    return index, count


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
@click.option("--force", is_flag=True, help="Overwrite existing output files (and a work folder left by --resume).")
@click.option("--resume", is_flag=True,
              help="Commit rows in chunks to a work folder beside -o FILE (FILE.protloc-work), so that a run "
                   "stopped or killed at any moment continues where it stopped when started again with --resume; "
                   "the output equals an uninterrupted run's. The inputs and settings must be the same.")
@click.option("--chunk-images", type=click.IntRange(min=1), default=CHUNK_IMAGES, show_default=True,
              help="--resume: images per committed chunk (a kill loses at most one chunk's work).")
@click.option("--shard", callback=_shard, metavar="I/N",
              help="Embed only the I-th (1..N) of N contiguous parts of the input list (a Slurm array task: "
                   "--shard $SLURM_ARRAY_TASK_ID/N with --array=1-N); `protloc merge` joins the parts.")
@data_options
@device_option
@common
@click.pass_context
def embed_command(ctx, data, output, ids_path, weights, arch, patch, layout, depth, size, normalize, pool, tile, stride,
                  aggregate, cells, cell_size, mask_outside, border, channel_strategy, fill, model_channels,
                  batch_size, workers, on_error, seed, force, channels, channel_suffixes, z, axes, series, max_pixels,
                  device, quiet, resume, chunk_images, shard):
    """Embed images: one vector per image (or per tile or cell), rows in input order.

    DATA: TIFF files, OME-Zarr images and plates, CSV manifests, directories (searched recursively,
    sorted) and - (paths on stdin, one per line).

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
    if resume and output == "-":
        raise click.UsageError("--resume needs -o FILE (its work folder lies beside FILE)")
    for path in ([output] if output != "-" else []) + ([ids_path] if ids_path else []):
        check_destination(path, force)

    opts = view_from_flags(ctx)  # what reading images takes before the model (a random one probes their channels)
    sources = discover(list(data), stdin=sys.stdin if "-" in data else None, channel_suffixes=channel_suffixes)
    if cells:
        sources = image_sources(sources, cells)
    part = None
    if shard:  # this part's slice of the whole list, and what identifies the list (for protloc merge)
        index, count = shard
        if count > len(sources):
            raise ProtlocError(f"--shard {index}/{count}: more parts than the {len(sources)} input image(s)")
        part = {"index": index, "count": count, "inputs": len(sources), "inputs_digest": inputs_digest(sources)}
        sources = sources[part_slice(len(sources), index - 1, count)]
    check_source_meta(sources)
    model, model_meta = load_backbone(weights, sources, opts, arch=arch, patch=int(patch), layout=layout,
                                      depth=depth, seed=seed, model_channels=model_channels, on_error=on_error)
    opts = view_from_flags(ctx, ViewOptions.from_record({}, weights, model.config))  # unset: as the model records
    world = distributed.init(device)  # under torchrun: this rank embeds its contiguous share
    try:
        if resume and world.size > 1:
            raise ProtlocError("--resume runs in one process; under torchrun give each job its own part with "
                               "--shard I/N and -o, then protloc merge")
        opts = dataset_normalization(opts, weights, sources, workers, on_error, quiet or not world.is_main)
        store = None
        if resume or os.path.isdir(work_folder(output)):  # a work folder left by a run: continue it or refuse
            fingerprint = {"inputs": inputs_digest(sources, with_stat=True), "model": model_meta,
                           "view": model_view(opts, model.config).to_record(), "batch size": batch_size,
                           "device": world.device.type, "on-error": on_error, "shard": part}
            store = ChunkStore(work_folder(output), fingerprint, len(sources), resume, force, chunk_images)
        writer, stats, ids, elapsed = _embed_share(ctx, world, model, sources, opts, output, batch_size, workers,
                                                   on_error, store)
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
    if part:
        meta["shard"] = part
    obs = row_columns(ids, sources, stats.view_meta if (tile or cells) and not aggregate else None)
    write_embeddings(output, writer, ids, meta, obs, stdout=sys.stdout.buffer)
    writer.close()
    if store is not None:  # the output is whole: the chunks are no longer needed
        store.remove()
    if ids_path:
        write_ids(ids_path, ids)

    if not quiet:
        ranks = f" on {world.size} processes" if world.size > 1 else ""
        views = f" as {stats.views} tile(s)" if tile else f" as {stats.views} cell(s)" if cells else ""
        click.echo(f"protloc: embedded {stats.images} image(s){views} -> ({writer.rows}, {writer.dim}) "
                   f"in {elapsed:.1f} s ({stats.images / elapsed:.1f} img/s, "
                   f"{stats.data_wait_s / elapsed:.0%} waiting for data)"
                   + (f"; skipped {len(stats.skipped)}" if stats.skipped else "") + ranks, err=True)


def _embed_share(ctx, world, model, sources, opts, output, batch_size, workers, on_error, store=None):
    """Embed this rank's share of the sources; on rank 0, every rank's rows in input order. With a
    `store` (one process), rows are committed to it chunk by chunk (protloc.embed_resume).

    Returns (writer or None, stats, ids, seconds): the merged results on rank 0."""
    start = time.perf_counter()
    stats = EmbedStats()
    writer = None  # its width is known with the first batch: D, or D x C with --channel-strategy per-channel
    ids: list[str] = []
    share = sources[my_slice(len(sources), world)]
    tmp_dir = os.path.dirname(os.path.abspath(output)) if output != "-" else None
    with tqdm(total=len(share), unit="img", disable=not (world.is_main and show_progress(ctx)), file=sys.stderr) as bar:
        kw = dict(batch_size=batch_size, device=world.device, workers=workers, on_error=on_error, progress=bar.update)
        rows = embed_resumable(store, model, share, opts, stats, **kw) if store else embed(model, share, opts,
                                                                                           stats=stats, **kw)
        for batch_ids, vectors in rows:
            if writer is None:
                writer = RowWriter(vectors.shape[1], tmp_dir=tmp_dir)
            writer.append(vectors)
            ids.extend(batch_ids)
    writer, infos = gather_to_main(world, writer, {"ids": ids, "stats": stats})
    if infos:  # rank 0: the others' after its own, in rank order
        ids = [i for part in infos for i in part["ids"]]
        stats = EmbedStats.merge([part["stats"] for part in infos])
    return writer, stats, ids, time.perf_counter() - start
