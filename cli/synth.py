"""`protloc synth`: a synthetic data set of cell fields with known localization labels."""

import os
import sys
from pathlib import Path

import click
from tqdm import tqdm

from protloc.cli.options import common, show_progress
from protloc.channels import parse_names
from protloc.errors import ProtlocError
from protloc.synth import CHANNELS, CLASSES, write_dataset


@click.command("synth", help=(
    "Write N synthetic fields (uint16 OME-TIFF with channel names) and OUT_DIR/labels.csv (path,label,group).\n\n"
    f"Each field holds a few cells with a nucleus and a protein channel whose pattern is one of {len(CLASSES)} "
    f"localization classes ({', '.join(CLASSES)}), with blur, shot and read noise."))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--n", "n", type=click.IntRange(min=1), default=200, help="Number of fields of view.")
@click.option("--size", type=click.IntRange(min=32), default=256, help="Field size in pixels (square).")
@click.option("--channels", default="nucleus,protein", metavar="NAMES",
              help=f"Channels to draw, in order; any of {','.join(CHANNELS)} (4 channels: an HPA-like layout).")
@click.option("--fields-per-protein", type=click.IntRange(min=1), default=4,
              help="Fields per synthetic protein; a protein is one `group` (never split by cross-validation).")
@click.option("--masks", is_flag=True,
              help="Also write each field's cells as a label image (uint16; 0 = background, one label per cell) to "
                   "OUT_DIR/masks/<field>.tif, for --cells OUT_DIR/masks. (A command without --cells would read "
                   "them as images: give it OUT_DIR/*.tif.)")
@click.option("--seed", type=int, default=0, help="Seed: the same seed gives the same files.")
@click.option("--force", is_flag=True, help="Write into OUT_DIR even if it already holds files.")
@common
@click.pass_context
def synth_command(ctx, out_dir, n, size, channels, fields_per_protein, masks, seed, force, quiet):
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise ProtlocError(f"{out}: exists and is not empty (use --force to write into it)")
    out.mkdir(parents=True, exist_ok=True)
    names = parse_names(channels)
    with tqdm(total=n, unit="field", disable=not show_progress(ctx), file=sys.stderr) as bar:
        rows = write_dataset(out, n=n, size=size, channels=names, seed=seed,
                             fields_per_protein=fields_per_protein, progress=bar.update, masks=masks)
    if not quiet:
        classes = len({r["label"] for r in rows})
        click.echo(f"protloc: wrote {n} field(s) of {size}x{size} ({','.join(names)}), {classes} classes, "
                   f"labels in {os.path.join(out_dir, 'labels.csv')}"
                   + (f", cell masks in {os.path.join(out_dir, 'masks')}" if masks else ""), err=True)
