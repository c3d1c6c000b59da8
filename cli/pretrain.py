"""`protloc pretrain`: DINO self-supervised pretraining on a folder of TIFFs."""

import sys
import time

import click
from click.core import ParameterSource
from tqdm import tqdm

from protloc import distributed
from protloc.augment import MultiCropConfig
from protloc.cli.options import architecture_options, common, data_options, device_option, show_progress
from protloc.cli.progress import status_line
from protloc.cli.signals import Stopped, stop_after_step
from protloc.data import ViewOptions
from protloc.dino import CENTERINGS
from protloc.errors import ProtlocError
from protloc.output import check_destination
from protloc.pretrain import PretrainConfig, Trainer, recorded_config
from protloc.sources import discover

# flags that leave the run as it is: --resume accepts any value of them (--on-error and
# --max-pixels decide whether a bad or huge image stops the run, never what an image reads as)
RUN_INDEPENDENT = {"--output", "--resume", "--init", "--stop-at", "--checkpoint-every", "--log", "--workers",
                   "--on-error", "--max-pixels", "--device", "--force", "--quiet", "--debug"}


def _settings(cfg: PretrainConfig) -> dict[str, object]:
    """The value of every flag that defines a run (all but RUN_INDEPENDENT), as `cfg` records it."""
    crops = cfg.crops
    return {"--arch": cfg.arch, "--patch": cfg.patch, "--layout": cfg.layout, "--depth": cfg.depth,
            "--channels": cfg.channels, "--channel-suffixes": cfg.channel_suffixes, "--z": cfg.z, "--axes": cfg.axes,
            "--series": cfg.series,
            "--normalize": cfg.normalize, "--out-dim": cfg.out_dim, "--drop-path": cfg.drop_path,
            "--use-bn-in-head": cfg.use_bn_in_head, "--batch-size": cfg.batch_size, "--steps": cfg.steps,
            "--epochs": cfg.epochs, "--lr": cfg.lr, "--min-lr": cfg.min_lr, "--warmup-epochs": cfg.warmup_epochs,
            "--weight-decay": cfg.weight_decay, "--weight-decay-end": cfg.weight_decay_end,
            "--clip-grad": cfg.clip_grad, "--freeze-last-layer": cfg.freeze_last_layer,
            "--momentum-teacher": cfg.momentum_teacher, "--teacher-temp": cfg.teacher_temp,
            "--warmup-teacher-temp": cfg.warmup_teacher_temp,
            "--warmup-teacher-temp-epochs": cfg.warmup_teacher_temp_epochs, "--global-size": crops.global_size,
            "--local-size": crops.local_size, "--local-crops": crops.local_crops,
            "--global-scale": tuple(crops.global_scale), "--local-scale": tuple(crops.local_scale),
            "--channel-dropout": crops.channel_dropout, "--no-pack": not cfg.pack, "--seed": cfg.seed,
            "--koleo": cfg.koleo, "--centering": cfg.centering, "--ibot": cfg.ibot,
            "--mask-ratio": tuple(cfg.mask_ratio), "--mask-prob": cfg.mask_prob}


def _given_flags(ctx) -> set[str]:
    """The flags of this invocation given on the command line (not left at their defaults)."""
    return {max(p.opts, key=len) for p in ctx.command.params
            if ctx.get_parameter_source(p.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}


def check_resume(recorded: PretrainConfig, given: PretrainConfig, flags: set[str], output: str) -> None:
    """--resume continues the run as recorded: a flag in `flags` (given explicitly) whose value in
    `given` differs from the recorded one is an error naming each (flag, checkpoint value, given value)."""
    was, now = _settings(recorded), _settings(given)
    differ = [f"{flag} (checkpoint: {was[flag]}, given: {now[flag]})" for flag in now
              if flag in flags and now[flag] != was[flag]]
    if differ:
        raise ProtlocError(f"{output}: --resume continues the run with the settings it records; given otherwise: "
                           f"{', '.join(differ)}. To train longer or otherwise, start a new run from its weights: "
                           f"protloc pretrain DATA -o NEW.pt --init {output} --steps N ...")


def _pair(_ctx, param, value):
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected two numbers like 0.4,1", param=param) from None
    if not 0 < lo <= hi <= 1:
        raise click.BadParameter(f"{value!r}: expected 0 < low <= high <= 1", param=param)
    return lo, hi


@click.command("pretrain")
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", required=True, metavar="CKPT", help="The checkpoint to write (and to --resume from).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Length of the run in optimizer steps.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Length of the run in passes over the data.")
@click.option("--resume", is_flag=True,
              help="Continue the run in CKPT exactly where it stopped, with the settings it records (flags that "
                   "change the run must be left out or equal them; to train longer, use --init).")
@click.option("--init", "init", metavar="CKPT", default=None,
              help="Start a new run (step 0, new optimizer, schedules and DINO head) from a checkpoint's backbone: "
                   "protloc, DINO, DINO4Cells or timm-style (.pth, .safetensors).")
@click.option("--stop-at", type=click.IntRange(min=1), default=None,
              help="Stop after this step with a checkpoint (e.g. to fit a job's time limit); --resume continues.")
@architecture_options("the backbone")
@click.option("--out-dim", type=click.IntRange(min=2), default=65536, help="DINO head output dimension.")
@click.option("--drop-path", type=click.FloatRange(0, 1, max_open=True), default=0.1, help="Stochastic depth of the student.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Images per step and process.")
@click.option("--lr", type=click.FloatRange(min=0), default=5e-4, help="Peak learning rate at a total batch of 256 (scaled linearly).")
@click.option("--min-lr", type=click.FloatRange(min=0), default=1e-6, help="Learning rate at the end of the cosine.")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=10.0, help="Linear learning-rate warm-up.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.04, help="Weight decay at the start (cosine to --weight-decay-end).")
@click.option("--weight-decay-end", type=click.FloatRange(min=0), default=0.4, help="Weight decay at the end.")
@click.option("--clip-grad", type=click.FloatRange(min=0), default=3.0,
              help="Per-parameter gradient norm clip (0: no clipping, as in DINO).")
@click.option("--freeze-last-layer", type=click.FloatRange(min=0), default=1.0, help="Epochs with the head's last layer frozen.")
@click.option("--use-bn-in-head", is_flag=True,
              help="Batch norm in the DINO head's hidden layers (DINO's --use_bn_in_head): short runs on small data learn much sooner.")
@click.option("--momentum-teacher", type=click.FloatRange(0, 1), default=0.996, help="Teacher EMA momentum (cosine to 1).")
@click.option("--teacher-temp", type=click.FloatRange(min=0, min_open=True), default=0.04,
              help="Teacher temperature after warm-up (DINO's recipe for longer runs: 0.07).")
@click.option("--warmup-teacher-temp", type=click.FloatRange(min=0, min_open=True), default=0.04,
              help="Teacher temperature at the start.")
@click.option("--warmup-teacher-temp-epochs", type=click.FloatRange(min=0), default=30.0, help="Teacher temperature warm-up.")
@click.option("--global-size", type=click.IntRange(min=16), default=224, help="Global crop size (2 per image).")
@click.option("--local-size", type=click.IntRange(min=16), default=96, help="Local crop size.")
@click.option("--local-crops", type=click.IntRange(min=0), default=8, help="Local crops per image.")
@click.option("--global-scale", default="0.4,1", callback=_pair, help="Area range of global crops.")
@click.option("--local-scale", default="0.05,0.4", callback=_pair, help="Area range of local crops.")
@click.option("--channel-dropout", type=click.FloatRange(0, 1), default=0.0,
              help="Probability of zeroing a channel of a crop (never the protein channel).")
@click.option("--normalize", type=click.Choice(["image", "percentile"]), default="image",
              help="Crops standardized with their whole image's channel mean / std (image), or its 1-99.8% "
                   "range mapped to 0-1 (percentile); recorded in the checkpoint, so embed uses the same.")
@click.option("--no-pack", is_flag=True, help="Run the transformer once per crop size (DINO's way) instead of one packed pass.")
@click.option("--koleo", type=click.FloatRange(min=0), default=PretrainConfig.koleo, metavar="W",
              help="Weight of DINOv2's KoLeo regularizer: pushes each student CLS feature of a global crop away from "
                   "its nearest neighbour in the batch, spreading features apart (DINOv2: 0.1; 0: off).")
@click.option("--centering", type=click.Choice(CENTERINGS), default=PretrainConfig.centering,
              help="Teacher targets: softmax after subtracting a running mean (center, DINO) or Sinkhorn-Knopp "
                   "(sinkhorn, DINOv2), which gives every output dimension an equal share of each batch.")
@click.option("--ibot", type=click.FloatRange(min=0), default=PretrainConfig.ibot, metavar="W",
              help="Weight of iBOT's masked-patch loss: the student sees some global crops with blocks of patches "
                   "replaced by a learned mask token and predicts the teacher's outputs there (DINOv2: 1.0; 0: off).")
@click.option("--mask-ratio", default=",".join(map(str, PretrainConfig.mask_ratio)), callback=_pair, metavar="LOW,HIGH",
              help="With --ibot: range of the share of a masked crop's patches that are masked (DINOv2's).")
@click.option("--mask-prob", type=click.FloatRange(0, 1, min_open=True), default=PretrainConfig.mask_prob,
              help="With --ibot: share of the global crops that are masked (DINOv2's).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, help="Steps between checkpoints.")
@click.option("--log", "log_path", metavar="FILE.jsonl", default=None, help="Append per-step metrics as JSON lines.")
@click.option("--seed", type=int, default=0, help="Seed of initialization, data order and augmentation.")
@click.option("--force", is_flag=True, help="Overwrite CKPT and start afresh.")
@data_options
@device_option
@common
@click.pass_context
def pretrain_command(ctx, data, output, steps, epochs, resume, init, stop_at, arch, patch, layout, depth, out_dim, drop_path,
                     batch_size, lr, min_lr, warmup_epochs, weight_decay, weight_decay_end, clip_grad,
                     freeze_last_layer, use_bn_in_head, momentum_teacher, teacher_temp, warmup_teacher_temp,
                     warmup_teacher_temp_epochs, global_size, local_size, local_crops, global_scale, local_scale,
                     channel_dropout, normalize, no_pack, koleo, centering, ibot, mask_ratio, mask_prob,
                     checkpoint_every, log_path, workers, on_error, seed, force,
                     channels, channel_suffixes, z, axes, series, max_pixels, device, quiet):
    """DINO self-supervised pretraining: a backbone that knows your cells, without labels.

    DATA: TIFF files, directories and - (paths on stdin). Runs on many GPUs or nodes with
    `torchrun --nproc-per-node N -m protloc pretrain ...` (only rank 0 writes).

    \b
    protloc pretrain cells/ -o dino.pt --arch vit_small --epochs 100 --log train.jsonl
    protloc pretrain cells/ -o dino.pt --resume      # continue after a stop or crash
    """
    crops = MultiCropConfig(global_size=global_size, local_size=local_size, local_crops=local_crops,
                            global_scale=global_scale, local_scale=local_scale,
                            channel_dropout=channel_dropout, normalize=normalize)
    cfg = PretrainConfig(arch=arch, patch=int(patch), layout=layout, depth=depth, channels=channels,
                         channel_suffixes=channel_suffixes, z=z, axes=axes, series=series, normalize=normalize,
                         drop_path=drop_path, out_dim=out_dim, batch_size=batch_size, steps=steps, epochs=epochs,
                         lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay,
                         weight_decay_end=weight_decay_end, clip_grad=clip_grad,
                         freeze_last_layer=freeze_last_layer, use_bn_in_head=use_bn_in_head,
                         momentum_teacher=momentum_teacher,
                         warmup_teacher_temp=warmup_teacher_temp, teacher_temp=teacher_temp,
                         warmup_teacher_temp_epochs=warmup_teacher_temp_epochs, crops=crops,
                         pack=not no_pack, seed=seed,
                         koleo=koleo, centering=centering, ibot=ibot, mask_ratio=mask_ratio, mask_prob=mask_prob)
    if resume:
        if init is not None:
            raise click.UsageError("--resume continues a run; --init starts one: give one of them")
        recorded = recorded_config(output)
        check_resume(recorded, cfg, _given_flags(ctx), output)
        cfg = recorded  # flags left out take the recorded values
    else:
        if (steps is None) == (epochs is None):
            raise click.UsageError("give the length of the run: --steps N or --epochs N (one of them)")
        check_destination(output, force)
    if not cfg.ibot and {"--mask-ratio", "--mask-prob"} & _given_flags(ctx):
        raise click.UsageError("--mask-ratio and --mask-prob set iBOT's masking: give --ibot W too")

    world = distributed.init(device)
    try:
        sources = discover(list(data), stdin=sys.stdin if "-" in data else None, channel_suffixes=cfg.channel_suffixes)
        trainer = Trainer(sources, cfg, output, world=world, view=ViewOptions(max_pixels=max_pixels), workers=workers,
                          on_error=on_error, resume=resume, init=init, checkpoint_every=checkpoint_every,
                          log_path=log_path)
        total = trainer.schedules.total
        if trainer.step >= total:
            raise ProtlocError(f"{output}: the run is already complete ({trainer.step} of {total} steps); to train "
                               f"longer, start a new run from its weights with --init {output}")
        start, t0 = trainer.step, time.perf_counter()
        bar = tqdm(total=total, initial=start, unit="step", file=sys.stderr,
                   disable=not (world.is_main and show_progress(ctx)))
        status = status_line(ctx, total, start) if world.is_main else None

        def on_step(metrics):
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            bar.update(1)
            if status is not None:
                status.update(metrics["loss"], metrics["images"])

        with bar, stop_after_step(trainer.request_stop) as received:
            trainer.run(stop_at=stop_at, on_step=on_step)
        if received:
            if not world.is_main:
                ctx.exit(128 + received[0].value)
            raise Stopped(received[0], f"after step {trainer.step} of {total}; checkpoint {output} "
                                       "(continue with --resume)")
        if world.is_main and not quiet:
            done = trainer.step - start
            elapsed = time.perf_counter() - t0
            click.echo(f"protloc: trained steps {start + 1}-{trainer.step} of {total} on {len(sources)} image(s) "
                       f"x {world.size} process(es) in {elapsed:.0f} s "
                       f"({done * cfg.batch_size * world.size / elapsed:.1f} img/s); checkpoint {output}", err=True)
    finally:
        distributed.close(world)
