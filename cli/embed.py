"""`protloc embed`: images -> embeddings (.npy on stdout by default), ids beside."""

import dataclasses
import os
import sys
import time

import click
from tqdm import tqdm

from protloc import __version__
from protloc.cli.options import (architecture_options, check_tiles, common, data_options, device_option, show_progress,
                                 view_options)
from protloc.data import ViewOptions
from protloc.device import resolve_device
from protloc.embed import EmbedStats, embed, load_backbone
from protloc.errors import ProtlocError
from protloc.embeddings import RowWriter, write_embeddings, write_ids
from protloc.output import check_destination
from protloc.sources import discover


def _check_output(output: str) -> None:
    if output != "-" and os.path.splitext(output)[1].lower() not in (".npy", ".npz"):
        raise click.BadParameter(f"{output}: the output must end in .npy or .npz (or be - for stdout)",
                                 param_hint="'-o' / '--output'")


@click.command("embed")
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", default="-", metavar="-|FILE.npy|FILE.npz",
              help="Where the embeddings go: - = .npy on stdout (refused on a terminal); .npz also holds ids and meta.")
@click.option("--ids", "ids_path", metavar="FILE",
              help="Write the row ids (one line per row: the image path, or the group stem) to FILE.")
@click.option("--weights", required=True, metavar="CKPT|random",
              help="A protloc checkpoint, or 'random' for a random-init baseline built from --arch/--patch/--layout.")
@architecture_options("a random backbone")
@view_options()
@click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Images (tiles with --tile) per forward pass.")
@click.option("--seed", type=int, default=0, help="Seed of a random backbone.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@data_options
@device_option
@common
@click.pass_context
def embed_command(ctx, data, output, ids_path, weights, arch, patch, layout, depth, size, normalize, pool, tile, stride,
                  aggregate, batch_size, workers, on_error, seed, force, channels, channel_suffixes, z, axes, max_pixels,
                  device, quiet):
    """Embed images: one vector per image (or per tile), rows in input order.

    DATA: TIFF files, directories (searched recursively, sorted) and - (paths on stdin, one per line).

    \b
    protloc embed images/ --weights random --arch vit_tiny --patch 8 --size 64 > emb.npy
    find plate1 -name '*.tif' | protloc embed - --weights model.pt -o emb.npz
    protloc embed fields/ --weights model.pt --tile 256 --aggregate mean -o emb.npz
    """
    _check_output(output)
    check_tiles(tile, stride, aggregate)
    if output == "-" and sys.stdout.isatty():
        raise ProtlocError("refusing to write binary .npy to a terminal: redirect stdout or use -o FILE")
    for path in ([output] if output != "-" else []) + ([ids_path] if ids_path else []):
        check_destination(path, force)

    sources = discover(list(data), stdin=sys.stdin if "-" in data else None, channel_suffixes=channel_suffixes)
    opts = ViewOptions(size=size, tile=tile, stride=stride, normalize=normalize or "image",
                       channels=tuple(channels) if channels else None, z=z, axes=axes, max_pixels=max_pixels)
    model, model_meta = load_backbone(weights, sources, opts, arch=arch, patch=int(patch), layout=layout,
                                      depth=depth, seed=seed)
    opts = dataclasses.replace(opts, normalize=normalize or model.config.normalize)
    device = resolve_device(device)

    start = time.perf_counter()
    stats = EmbedStats()
    writer = RowWriter(model.dim, tmp_dir=os.path.dirname(os.path.abspath(output)) if output != "-" else None)
    ids: list[str] = []
    with tqdm(total=len(sources), unit="img", disable=not show_progress(ctx), file=sys.stderr) as bar:
        for batch_ids, vectors in embed(model, sources, opts, pool=pool, batch_size=batch_size, device=device,
                                        workers=workers, on_error=on_error, stats=stats, progress=bar.update,
                                        aggregate=aggregate):
            writer.append(vectors)
            ids.extend(batch_ids)
    if writer.rows == 0:
        raise ProtlocError(f"no image could be embedded ({len(stats.skipped)} skipped)")

    meta = {"protloc": __version__, **model_meta, "pool": pool, "size": size, "normalize": opts.normalize,
            "channels": list(channels) if channels else None, "channel_suffixes": channel_suffixes,
            "z": z, "cwd": os.getcwd(), "skipped": [i for i, _ in stats.skipped],
            "tile": tile, "stride": stride or tile, "aggregate": aggregate}
    if tile and not aggregate:  # rows are tiles: where each lies in its image
        meta["tile_origins"] = [list(origin) for origin in stats.origins]
    write_embeddings(output, writer, ids, meta, stdout=sys.stdout.buffer)
    writer.close()
    if ids_path:
        write_ids(ids_path, ids)

    if not quiet:
        elapsed = time.perf_counter() - start
        tiles = f" as {stats.tiles} tile(s)" if tile else ""
        click.echo(f"protloc: embedded {stats.images} image(s){tiles} -> ({writer.rows}, {model.dim}) in {elapsed:.1f} s "
                   f"({stats.images / elapsed:.1f} img/s, {stats.data_wait_s / elapsed:.0%} waiting for data)"
                   + (f"; skipped {len(stats.skipped)}" if stats.skipped else ""), err=True)
