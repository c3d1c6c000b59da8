"""`protloc finetune`: a localization classifier from labelled images or embeddings, cross-validated."""

import contextlib
import json
import logging
import sys
import time
from collections import Counter

import click
from click.core import ParameterSource
from tqdm import tqdm

from protloc import __version__
from protloc.cells import image_sources
from protloc.classifier import save_classifier
from protloc.cli.options import (architecture_options, cell_options, channel_options, check_views, common, data_options,
                                 dataset_normalization, device_option, label_options, show_progress, view_from_flags,
                                 view_options)
from protloc.cli.progress import status_line
from protloc.cli.signals import Stopped, stop_after_step
from protloc.crossval import cross_validate, final_split, format_table, plan, summarize
from protloc.data import ViewOptions
from protloc.device import resolve_device
from protloc.embed import load_backbone
from protloc.embeddings import is_embeddings, read_embeddings
from protloc.errors import ProtlocError
from protloc.finetune import STEP_SETTINGS, FinetuneConfig, check_mode, steps_per_epoch
from protloc.finetune_setup import labelled_images, prepare_embeddings, prepare_images
from protloc.folds import check_folds, require_classes, scored_classes
from protloc.head import BALANCES, HEADS, PROBE_C, PROBE_FOLDS, PROBE_MAX_ITER
from protloc.labels import labels_of_rows, obs_column, read_labels
from protloc.output import atomic_path, check_destination
from protloc.sources import discover


log = logging.getLogger("protloc.cli")

NOTHING_WRITTEN = "during fine-tuning; nothing written (fine-tuning has no resume: rerun it)"


def _fine_tuning_step(ctx, fits: list, cfg: FinetuneConfig, received: list):
    """FullTask.on_step: a status line for logs (stderr no terminal), and a stop after the step
    in which a signal came (`received`, from stop_after_step)."""
    steps = cfg.epochs * sum(steps_per_epoch(len(fit.train), cfg) for fit in fits)  # early stopping: fewer
    status = status_line(ctx, steps, what="fine-tuning step")

    def on_step(loss, images):
        if status is not None:
            status.update(loss, images)
        if received:
            raise Stopped(received[0], NOTHING_WRITTEN)
    return on_step


def _chosen_C(values) -> str:
    """`0.1 (2 fits), 1 (3 fits)`: the linear probe's C values, smallest first."""
    return ", ".join(f"{c:.3g} ({n} fit{'s' if n != 1 else ''})" for c, n in sorted(Counter(values).items()))


@click.command("finetune")
@click.argument("inputs", metavar="DATA...|EMB", nargs=-1, required=True)
@label_options
@click.option("-o", "--output", metavar="MODEL", default=None,
              help="Write the classifier fitted on all labelled rows after the cross-validation (with its own "
                   "validation split). Without -o only the cross-validation runs.")
@click.option("--freeze", is_flag=True,
              help="Train a head on frozen embeddings (the study's frozen-backbone protocol); implied by an EMB "
                   "input. Default: fine-tune backbone and head together from images.")
@click.option("--weights", metavar="CKPT|random", default=None,
              help="Images: the backbone (a protloc checkpoint or MODEL, or 'random' from --arch/--patch/--layout/"
                   "--depth). Not for an EMB input.")
@architecture_options("a random backbone")
@click.option("--head", "head_kind", type=click.Choice(HEADS), default="linear",
              help="linear: D -> classes; mlp: D -> 512 -> 256 -> classes (ReLU, dropout 0.5). With --freeze the "
                   "linear head is a linear probe: logistic regression on standardized features solved to "
                   "convergence (L-BFGS), its L2 strength C chosen from 1e-4..1e4 by inner cross-validation on "
                   "each training part (grouped as the folds); the step options below are for mlp and fine-tuning.")
@click.option("--folds", type=click.IntRange(min=0), default=5,
              help="Cross-validation folds, stratified, grouped by the group column when present, else by image "
                   "(0: no cross-validation, only fit MODEL). Classes whose rows lie in one group are not scored.")
@click.option("--seeds", type=click.IntRange(min=1), default=1,
              help="Repeat the cross-validation with seeds --seed, --seed+1, ...: macro F1 is mean ± std over "
                   "folds x seeds.")
@click.option("--seed", type=int, default=0,
              help="First seed: folds, fraction, validation split, initialization, data order, augmentation, "
                   "and a random backbone.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              help="Train on this stratified fraction of each training split, at least one image per class "
                   "(the data-scaling experiment; MODEL too).")
@click.option("--val-fraction", type=click.FloatRange(0, 0.5), default=None,
              help="Part of each training split held out for early stopping (stratified; grouped when there are "
                   "enough groups); 0: no early stopping, all --epochs. Default: 0 with --freeze (a head on frozen "
                   "features: a small validation split picks a noisy epoch and costs training rows), 0.1 fine-tuning. "
                   "Not for the frozen linear probe.")
@click.option("--balance", type=click.Choice(BALANCES), default="weight",
              help="Class balance for macro F1: weight the loss by inverse class frequency, sample rows "
                   "class-balanced (the linear probe weighs each row by 1 / its class's count instead), or none.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs per fit of the mlp head and fine-tuning (early stopping may end it sooner). Default: 100 "
                   "with --freeze, 30 fine-tuning.")
@click.option("--min-steps", type=click.IntRange(min=0), default=None,
              help="Optimizer steps per fit at least (mlp head, fine-tuning): an epoch is one pass over the "
                   "training rows, or as many passes as make min-steps / epochs steps when one pass makes fewer, so "
                   "that a small data set still gets enough updates. Default: 500 with --freeze, 300 fine-tuning.")
@click.option("--patience", type=click.IntRange(min=1), default=20,
              help="Early stopping: epochs without a better validation macro F1 (ties: lower loss); the best "
                   "epoch's weights are kept.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3,
              help="AdamW learning rate of the head (mlp head, fine-tuning).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.05,
              help="AdamW weight decay, weight matrices only (mlp head, fine-tuning).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Rows per step (mlp head, fine-tuning). Default: 256 with --freeze, 32 images fine-tuning.")
@click.option("--backbone-lr-scale", type=click.FloatRange(min=0), default=0.1,
              help="Fine-tuning: the backbone's learning rate is the head's times this.")
@click.option("--layer-decay", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              help="Fine-tuning: block i of L learns at layer_decay ** (L - i) times the backbone rate (1: off; "
                   "0.65-0.75 is usual for ViTs).")
@view_options(size_help="native with --freeze (as embed); 224 fine-tuning (crops and evaluation views)")
@cell_options()
@channel_options()
@click.option("--ids", "ids_path", metavar="FILE", help="Row ids of an .npy EMB (as written by `protloc embed --ids`).")
@click.option("--id-column", default=None,
              help="Labels column matched to the images / row ids. Default: path, else id.")
@click.option("--label-column", default="label", help="Labels column holding the class(es).")
@click.option("--group-column", default="group", help="Labels column holding groups (used when present).")
@click.option("--no-groups", is_flag=True,
              help="Ignore the labels' group column: folds split by image (its tiles and cells stay together), the "
                   "ungrouped protocol, chosen explicitly.")
@click.option("--json", "json_path", metavar="FILE",
              help="Write the metrics as JSON: every fold and seed, mean ± std macro F1, per-class F1, "
                   "confusion matrix.")
@click.option("--force", is_flag=True, help="Overwrite existing MODEL / --json files.")
@data_options
@device_option
@common
@click.pass_context
def finetune_command(ctx, inputs, labels_path, groups_spec, output, freeze, weights, arch, patch, layout, depth,
                     head_kind, folds, seeds, seed, fraction, val_fraction, balance, epochs, min_steps, patience, lr,
                     weight_decay, batch_size, backbone_lr_scale, layer_decay, size, normalize, pool, tile, stride,
                     aggregate, cells, cell_size, mask_outside, border, channel_strategy, fill, model_channels,
                     ids_path, id_column, label_column, group_column, no_groups, json_path, force, channels,
                     channel_suffixes, z, axes, series, max_pixels, workers, on_error, device, quiet):
    """Train a localization classifier and cross-validate it: per-class F1 and macro F1 of the pooled
    out-of-fold predictions, beside the per-fold macro F1 (mean ± std over folds x seeds).

    DATA: TIFF files, OME-Zarr, CSV manifests, directories and - (paths on stdin), with --weights; or
    EMB: one embeddings file from `protloc embed` (.npz, .h5ad, .zarr, or .npy with --ids), on which a
    head is trained (--freeze implied).
    The table goes to stdout.

    \b
    protloc finetune emb.npz --labels labels.csv --head mlp --folds 5 --seeds 3 -o head.pt
    protloc finetune emb.h5ad --labels obs:label --groups obs:gene -o head.pt
    protloc finetune cells/ --labels labels.csv --weights dino.pt --freeze --json cv.json
    protloc finetune cells/ --labels labels.csv --weights dino.pt --size 224 -o model.pt
    protloc finetune fields/ --labels labels.csv --weights dino.pt --freeze --cells fields/masks -o cells.pt
    """
    from_embeddings = is_embeddings(inputs)
    if folds == 1:
        raise click.UsageError("--folds 1 is no cross-validation: give 0 (only fit MODEL) or at least 2")
    if output is None and folds == 0:
        raise click.UsageError("nothing to do: give -o MODEL, --folds 2 or more, or both")
    check_views(tile, stride, aggregate, cells, cell_size, mask_outside, border)
    if from_embeddings and (weights or tile or cells or size is not None or normalize):
        raise click.UsageError("--weights, --size, --normalize, --tile and --cells go with images; an EMB file is "
                               "embedded already")
    if not from_embeddings and weights is None:
        raise click.UsageError("images need a backbone: --weights CKPT|random (or give an EMB file)")
    if ids_path and not from_embeddings:
        raise click.UsageError("--ids goes with an .npy EMB input")
    if not from_embeddings and (obs_column(labels_path) is not None or groups_spec):
        raise click.UsageError("--labels obs:COLUMN and --groups take columns of an EMB file; images take a labels CSV")
    if groups_spec and no_groups:
        raise click.UsageError("--groups and --no-groups contradict each other")
    freeze = freeze or from_embeddings
    if not freeze and size == 0:
        raise click.UsageError("--size 0 (native size) goes with --freeze (fine-tuning trains on crops of one size)")
    opts = view_from_flags(ctx)  # what reading images takes before the model (a random one probes their channels)
    try:
        check_mode(freeze, opts)
    except ProtlocError as e:  # a combination of flags: a usage error
        raise click.UsageError(str(e)) from None
    cfg = FinetuneConfig.for_mode(freeze, head_kind, epochs=epochs, min_steps=min_steps, patience=patience, lr=lr,
                                  weight_decay=weight_decay, batch_size=batch_size, val_fraction=val_fraction,
                                  balance=balance, backbone_lr_scale=backbone_lr_scale, layer_decay=layer_decay)
    unused = [f"--{name.replace('_', '-')}" for name in STEP_SETTINGS
              if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if cfg.probe and unused:
        log.warning("%s not used: the frozen linear head is a linear probe solved to convergence (C by inner "
                    "cross-validation); they train the mlp head and fine-tuning", ", ".join(unused))
    for path in (output, json_path):
        if path:
            check_destination(path, force)
    device = resolve_device(device)
    start = time.perf_counter()

    if from_embeddings:
        emb = read_embeddings(inputs[0], ids_path, need_ids=True)
        labels = labels_of_rows(emb, labels_path, groups_spec, id_column=id_column, label_column=label_column,
                                group_column=None if no_groups else group_column, channel_suffixes=channel_suffixes)
        run = prepare_embeddings(emb, labels, cfg, device, channel_suffixes)
    else:
        labels = read_labels(labels_path, id_column=id_column, label_column=label_column,
                             group_column=None if no_groups else group_column)
        sources = discover(list(inputs), stdin=sys.stdin if "-" in inputs else None, channel_suffixes=channel_suffixes)
        if cells:
            sources = image_sources(sources, cells)
        sources, matched = labelled_images(sources, labels, freeze, opts.channel_suffixes)
        model, meta = load_backbone(weights, sources, opts, arch=arch, patch=int(patch), layout=layout, depth=depth,
                                    seed=seed, model_channels=model_channels, on_error=on_error)
        cfg, opts = cfg.with_view(view_from_flags(ctx, ViewOptions.from_record({}, weights, model.config)))
        opts = dataset_normalization(opts, weights, sources, workers, on_error, quiet)
        with tqdm(total=len(sources), unit="img", desc="embedding", disable=not (freeze and show_progress(ctx)),
                  file=sys.stderr) as bar:
            run = prepare_images(model, meta, sources, matched, labels, opts, cfg, device, workers, on_error,
                                 bar.update)
    task, rows, cfg = run.task, run.rows, run.cfg
    if not quiet:
        click.echo(f"protloc: {len(rows.ids)} labelled row(s), {len(rows.classes)} classes"
                   f"{' (multi-label)' if rows.multilabel else ''}{', grouped' if rows.groups is not None else ''}; "
                   f"{cfg.head} {run.what}", err=True)

    splits, scored = [], None
    if folds:  # what the folds can measure, before any fitting
        scored = scored_classes(rows.y, rows.groups, rows.classes, labels_path, folds, labels.groups is not None)
        splits = plan(rows.y, rows.groups, rows.multilabel, folds, seeds, seed, fraction, cfg.val_fraction)
        check_folds(rows.y, [(sp.train, sp.test) for sp in splits], rows.classes, scored)
    else:
        require_classes(rows.y, rows.classes, labels_path)
    split = final_split(rows.y, rows.groups, rows.multilabel, seed, fraction, cfg.val_fraction) if output else None
    fits = len(splits) + (output is not None)
    # full fine-tuning stops after its current step on SIGINT / SIGTERM, writing nothing (it has no resume)
    with (contextlib.nullcontext([]) if freeze else stop_after_step() as received,
          tqdm(total=fits, unit="fit", disable=not show_progress(ctx), file=sys.stderr) as bar):
        if not freeze:
            task.on_step = _fine_tuning_step(ctx, splits + ([split] if split else []), cfg, received)

        def on_epoch(epoch, f1):
            bar.set_postfix(epoch=epoch, **({"val_f1": f"{f1:.3f}"} if f1 is not None else {}))

        report = None
        if splits:
            runs, pooled = cross_validate(task, rows.y, rows.multilabel, splits, on_epoch, lambda _: bar.update(1),
                                          scored)
            report = summarize(runs, pooled, rows.y, rows.classes, rows.multilabel, scored)
        final = None
        if output is not None:
            fitted = task.fit(split.train, split.val, seed, on_epoch)
            bar.update(1)
            final = {"model": output, "n_train": len(split.train), "n_val": len(split.val),
                     "best_epoch": fitted.best_epoch, "epochs": fitted.epochs, "C": fitted.C}
    if received:  # came after the last step (while evaluating): stop before writing anything
        raise Stopped(received[0], NOTHING_WRITTEN)

    settings = {"protloc": __version__, "input": inputs[0] if from_embeddings else list(inputs),
                "labels": labels_path, "rows": len(rows.ids), "classes": rows.classes, "multilabel": rows.multilabel,
                "grouped": rows.groups is not None, "no_groups": no_groups, "folds": folds, "seeds": seeds,
                "seed": seed, "fraction": fraction, **cfg.to_dict(),
                "probe": ({"C_grid": list(PROBE_C), "inner_folds": PROBE_FOLDS, "max_iter": PROBE_MAX_ITER}
                          if cfg.probe else None)}
    if output is not None:
        cv = {k: report[k] for k in ("macro_f1_pooled", "macro_f1", "accuracy")} if report else None
        save_classifier(output, fitted.head, classes=rows.classes, multilabel=rows.multilabel, views=run.views,
                        backbone_ref=run.backbone_ref, finetune=settings,
                        trained_on={"labels": labels_path, "rows": len(rows.ids),
                                    **{k: final[k] for k in ("n_train", "n_val", "best_epoch", "epochs", "C")}},
                        cv=cv, backbone=fitted.backbone or run.backbone)
    if json_path:
        with atomic_path(json_path) as tmp, open(tmp, "w") as f:
            json.dump({"meta": settings, **(report or {}), "final": final}, f, indent=2)
    if report:
        click.echo(format_table(report, folds, seeds))
    if not quiet:
        if cfg.probe:
            chosen = f"; linear probe C by inner cross-validation: {_chosen_C(r['C'] for r in report['runs'])}" \
                if report else ""
            done = chosen + (f"; MODEL {output} (C = {final['C']:.3g})" if final else "")
        else:
            done = f"; MODEL {output} (best epoch {final['best_epoch']} of {final['epochs']})" if final else ""
        click.echo(f"protloc: {fits} fit(s) in {time.perf_counter() - start:.1f} s{done}", err=True)
