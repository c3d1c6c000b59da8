"""`protloc merge`: the parts of a sharded embed (`--shard I/N`) joined into one embeddings file."""

import dataclasses

import click
import numpy as np

from protloc.cli.options import common
from protloc.embeddings import RowWriter, check_output, read_embeddings, write_embeddings, write_ids
from protloc.merge import check_parts, merged_meta, merged_obs
from protloc.output import check_destination


def _without_rows(emb):
    return dataclasses.replace(emb, x=np.zeros((0, emb.x.shape[1]), np.float32))


@click.command("merge")
@click.argument("parts", metavar="PART...", nargs=-1, required=True)
@click.option("-o", "--output", required=True, metavar="FILE",
              help="The joined embeddings: .npz, .h5ad or .zarr (ids, meta and per-row columns inside), or .npy "
                   "with --ids.")
@click.option("--ids", "ids_path", metavar="FILE", help="Also write the row ids, one per line.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@common
def merge_command(parts, output, ids_path, force, quiet):
    """Join the parts of one `protloc embed --shard I/N` run, in input order.

    PART: the .npz, .h5ad or .zarr of each part, in any order. Parts of another run (other inputs, model or settings),
    a missing or repeated part are refused, naming the file.

    \b
    sbatch --array=1-8 --wrap 'protloc embed plates/ --weights dino.pt --shard $SLURM_ARRAY_TASK_ID/8 \\
        -o part-$SLURM_ARRAY_TASK_ID.npz'
    protloc merge part-*.npz -o emb.npz
    """
    check_output(output)
    for path in [output] + ([ids_path] if ids_path else []):
        check_destination(path, force)
    # checked first with their ids and meta, then their rows read one part at a time: memory holds one part
    ordered = check_parts([_without_rows(read_embeddings(p, need_ids=True)) for p in parts])
    writer = RowWriter(ordered[0].x.shape[1])
    ids = []
    for part in ordered:
        writer.append(read_embeddings(part.source).x)
        ids.extend(part.ids)
    write_embeddings(output, writer, ids, merged_meta(ordered), merged_obs(ordered))
    writer.close()
    if ids_path:
        write_ids(ids_path, ids)
    if not quiet:
        click.echo(f"protloc: merged {len(ordered)} part(s) -> ({writer.rows}, {writer.dim}) {output}", err=True)
