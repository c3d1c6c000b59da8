"""`protloc knn`: DINO's weighted k-NN classifier, cross-validated, as macro F1 per k."""

import json
import math
import sys

import click

from protloc.cli.options import common, label_options
from protloc.embeddings import read_embeddings
from protloc.knn import cross_validate, format_table, results_to_json
from protloc.labels import labels_of_rows, match_rows
from protloc.neighbours import INDEXES, NPROBE, Search
from protloc.output import atomic_path, check_destination


def _ks(_ctx, param, value):
    try:
        ks = sorted({int(k) for k in value.split(",") if k.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers like 1,5,10", param=param) from None
    if not ks or ks[0] < 1:
        raise click.BadParameter(f"{value!r}: every k must be >= 1", param=param)
    return ks


def _finite(_ctx, param, value):
    if not math.isfinite(value):
        raise click.BadParameter(f"{value}: expected a finite number > 0", param=param)
    return value


@click.command("knn")
@click.argument("embs", metavar="EMB...", nargs=-1, required=True)
@label_options
@click.option("--ids", "ids_path", metavar="FILE",
              help="Row ids of an .npy (as written by `protloc embed --ids`); one EMB only.")
@click.option("-k", "ks", default="1,5,10,20,50", callback=_ks, metavar="K,K,..", help="Numbers of neighbours.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.07, callback=_finite,
              help="Vote weight exp(similarity / T), as in DINO; any finite T > 0 (computed stably).")
@click.option("--folds", type=click.IntRange(min=2), default=5,
              help="Stratified cross-validation folds (grouped by the `group` column when present, else by image). "
                   "Classes whose rows lie in one group are not scored.")
@click.option("--loo", is_flag=True, help="Leave-one-out instead of folds (a query's whole group is left out).")
@click.option("--no-groups", is_flag=True,
              help="Ignore the labels' group column: split by image (its tiles and cells stay together), the "
                   "ungrouped protocol, chosen explicitly.")
@click.option("--seed", type=int, default=0, help="Seed of the fold assignment.")
@click.option("--json", "json_path", metavar="FILE", help="Also write the results as JSON.")
@click.option("--id-column", default=None, help="Labels column matched to the row ids. Default: path, else id.")
@click.option("--label-column", default="label", help="Labels column holding the class(es).")
@click.option("--group-column", default="group", help="Labels column holding groups (used when present).")
@click.option("--channel-suffixes", default=None, metavar="A,B,..",
              help="Suffixes of one-file-per-channel images, to match label paths to group stems "
                   "(default: those recorded in an .npz).")
@click.option("--force", is_flag=True, help="Overwrite an existing --json file.")
@click.option("--index", type=click.Choice(INDEXES), default="exact",
              help="How neighbours are found: exact (blocked, the default) or faiss (approximate, for millions "
                   "of rows; pip install 'protloc[faiss]'; not with --loo).")
@click.option("--nprobe", type=click.IntRange(min=1), default=NPROBE,
              help="faiss lists searched per query: more is closer to exact and slower.")
@common
def knn_command(embs, labels_path, groups_spec, ids_path, ks, temperature, folds, loo, no_groups, seed, json_path,
                id_column, label_column, group_column, channel_suffixes, force, index, nprobe, quiet):
    """Evaluate embeddings by weighted k-NN, per k: macro F1 of the pooled out-of-fold predictions,
    and macro F1 and accuracy per fold (mean ± std); leave-one-out: pooled macro F1 and accuracy.

    EMB: an .npy (with --ids), an .npz or AnnData (.h5ad, .zarr) from `protloc embed`, or - (an .npy
    or .npz on stdin). Several EMB files (e.g. random-init and pretrained) are evaluated on the same
    folds and shown side by side. The table goes to stdout.

    \b
    protloc knn random.npz dino.npz --labels cells/labels.csv
    protloc knn emb.h5ad --labels obs:label --groups obs:gene"""
    if ids_path and len(embs) > 1:
        raise click.UsageError("--ids goes with a single EMB; use .npz files to compare several")
    if json_path:
        check_destination(json_path, force)
    if groups_spec and no_groups:
        raise click.UsageError("--groups and --no-groups contradict each other")
    search = Search(index, nprobe, seed)
    runs, records = [], []
    for emb in embs:
        emb_file = read_embeddings(emb, ids_path, stdin=sys.stdin.buffer if emb == "-" else None, need_ids=True)
        suffixes = channel_suffixes.split(",") if channel_suffixes else emb_file.meta.get("channel_suffixes")
        labels = labels_of_rows(emb_file, labels_path, groups_spec, id_column=id_column, label_column=label_column,
                                group_column=None if no_groups else group_column, channel_suffixes=suffixes)
        matched = match_rows(emb_file.ids, labels, base_dir=emb_file.meta.get("cwd"), channel_suffixes=suffixes)
        if not quiet:
            click.echo(f"protloc: {emb_file.source}: {len(matched.rows)} labelled row(s), "
                       f"{len(matched.classes)} classes"
                       f"{' (multi-label)' if matched.multilabel else ''}"
                       + (f"; {matched.unlabeled} unlabelled row(s) ignored" if matched.unlabeled else ""), err=True)
        results = cross_validate(emb_file.x, matched, ks=ks, folds=folds, loo=loo, temperature=temperature, seed=seed,
                                 search=search)
        runs.append((emb_file.source, results))
        meta = {"embeddings": emb_file.source, "labels": labels_path, "groups": groups_spec,
                "rows": int(len(matched.rows)),
                "classes": matched.classes, "multilabel": matched.multilabel, "temperature": temperature,
                "protocol": "leave-one-out" if loo else f"{folds}-fold", "seed": seed,
                "grouped": matched.groups is not None, "no_groups": no_groups, **search.record()}
        records.append(results_to_json(results, meta))
    click.echo(format_table(runs, loo))
    if json_path:
        with atomic_path(json_path) as tmp, open(tmp, "w") as f:
            json.dump({"runs": records}, f, indent=2)
