"""`protloc pretrain`: DINO self-supervised pretraining on a folder of TIFFs."""

import sys
import time

import click
from click.core import ParameterSource
from tqdm import tqdm

from protloc import distributed
from protloc.augment import NORMALIZE
from protloc.cli.options import architecture_options, common, data_options, device_option, show_progress
from protloc.cli.progress import status_line
from protloc.cli.signals import Stopped, stop_after_step
from protloc.data import ViewOptions
from protloc.dino import CENTERINGS
from protloc.embed import POOLINGS
from protloc.errors import ProtlocError
from protloc.output import check_destination
from protloc.pretrain import PretrainConfig, Trainer, recorded_config
from protloc.recipes import DEFAULT, RECIPES, changes, resolve, settings
from protloc.sources import discover

# flags that leave the run as it is: --resume accepts any value of them (--on-error and
# --max-pixels decide whether a bad or huge image stops the run, never what an image reads as)
RUN_INDEPENDENT = {"--output", "--resume", "--init", "--stop-at", "--checkpoint-every", "--log", "--workers",
                   "--on-error", "--max-pixels", "--device", "--force", "--quiet", "--debug"}


def _settings(cfg: PretrainConfig) -> dict[str, object]:
    """The value of every flag that defines a run (all but RUN_INDEPENDENT), as `cfg` records it."""
    crops = cfg.crops
    return {"--recipe": cfg.recipe, "--arch": cfg.arch, "--patch": cfg.patch, "--layout": cfg.layout, "--depth": cfg.depth,
            "--channels": cfg.channels, "--channel-suffixes": cfg.channel_suffixes, "--z": cfg.z, "--axes": cfg.axes,
            "--series": cfg.series,
            "--normalize": cfg.normalize, "--embed-size": cfg.embed_size, "--embed-pool": cfg.embed_pool,
            "--out-dim": cfg.out_dim, "--drop-path": cfg.drop_path,
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


GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
SETTINGS = set(settings(RECIPES[DEFAULT])) - {"recipe"}  # what a flag of the same name sets


def _given_flags(ctx) -> set[str]:
    """The flags of this invocation given on the command line (not left at their defaults)."""
    return {max(p.opts, key=len) for p in ctx.command.params if ctx.get_parameter_source(p.name) in GIVEN}


def _show(value) -> str:
    """A setting as its flag takes it: 0.4,1 for a pair, on/off for a switch, 0 for native size."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return "0 (native)" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _recipe_default(name: str) -> str:
    """The help text of a recipe's setting: its value in each recipe."""
    values = {recipe: _show(settings(cfg)[name]) for recipe, cfg in RECIPES.items()}
    if len(set(values.values())) == 1:
        return f" Default: {next(iter(values.values()))} (every --recipe)."
    return " Default: the --recipe's: " + ", ".join(f"{r} {v}" for r, v in values.items()) + "."


def _recipes_help(command: click.Command) -> str:
    """What each recipe is for, and what `small` sets, as the flags of `command` (or name=value
    for a setting without a flag)."""
    options = {p.name: p for p in command.params}

    def flag(name, value):
        option = options.get(name)
        if option is None:
            return f"{name}={_show(value)}"
        if option.is_bool_flag:
            return (option.opts if value else option.secondary_opts)[0]
        return f"{max(option.opts, key=len)} {_show(value)}"
    small = " ".join(flag(k, v) for k, v in changes("small").items())
    return ("A whole set of settings (protloc/recipes.py); each flag given replaces one of them. dino: the DINO "
            "reference's, made for ImageNet on many GPUs. small (the default): for a few hundred to a few hundred thousand images "
            f"on a CPU or one GPU: dino's except {small}.")


def _config(ctx) -> PretrainConfig:
    """The run's settings: those of the --recipe, each replaced by its flag's value when the flag is given."""
    given = {name: value for name, value in ctx.params.items()
             if (name in SETTINGS or name == "no_pack") and ctx.get_parameter_source(name) in GIVEN}
    if "patch" in given:
        given["patch"] = int(given["patch"])
    if "no_pack" in given:
        given["pack"] = not given.pop("no_pack")
    if "embed_size" in given:
        given["embed_size"] = given["embed_size"] or None  # 0: native size
    return resolve(ctx.params["recipe"], given)


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
    if value is None:
        return None
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
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=DEFAULT)  # its help: below
@architecture_options("the backbone", _recipe_default)
@click.option("--out-dim", type=click.IntRange(min=2), help="DINO head output dimension." + _recipe_default("out_dim"))
@click.option("--drop-path", type=click.FloatRange(0, 1, max_open=True),
              help="Stochastic depth of the student." + _recipe_default("drop_path"))
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per step and process." + _recipe_default("batch_size"))
@click.option("--lr", type=click.FloatRange(min=0),
              help="Peak learning rate at a total batch of 256 (scaled linearly)." + _recipe_default("lr"))
@click.option("--min-lr", type=click.FloatRange(min=0),
              help="Learning rate at the end of the cosine." + _recipe_default("min_lr"))
@click.option("--warmup-epochs", type=click.FloatRange(min=0),
              help="Linear learning-rate warm-up." + _recipe_default("warmup_epochs"))
@click.option("--weight-decay", type=click.FloatRange(min=0),
              help="Weight decay at the start (cosine to --weight-decay-end)." + _recipe_default("weight_decay"))
@click.option("--weight-decay-end", type=click.FloatRange(min=0),
              help="Weight decay at the end." + _recipe_default("weight_decay_end"))
@click.option("--clip-grad", type=click.FloatRange(min=0),
              help="Per-parameter gradient norm clip (0: no clipping, as in DINO)." + _recipe_default("clip_grad"))
@click.option("--freeze-last-layer", type=click.FloatRange(min=0),
              help="Epochs with the head's last layer frozen." + _recipe_default("freeze_last_layer"))
@click.option("--use-bn-in-head/--no-bn-in-head", default=None,
              help="Batch norm in the DINO head's hidden layers (DINO's --use_bn_in_head): short runs on small data "
                   "learn much sooner." + _recipe_default("use_bn_in_head"))
@click.option("--momentum-teacher", type=click.FloatRange(0, 1),
              help="Teacher EMA momentum (cosine to 1)." + _recipe_default("momentum_teacher"))
@click.option("--teacher-temp", type=click.FloatRange(min=0, min_open=True),
              help="Teacher temperature after warm-up (DINO's recipe for longer runs: 0.07)."
                   + _recipe_default("teacher_temp"))
@click.option("--warmup-teacher-temp", type=click.FloatRange(min=0, min_open=True),
              help="Teacher temperature at the start." + _recipe_default("warmup_teacher_temp"))
@click.option("--warmup-teacher-temp-epochs", type=click.FloatRange(min=0),
              help="Teacher temperature warm-up." + _recipe_default("warmup_teacher_temp_epochs"))
@click.option("--global-size", type=click.IntRange(min=16),
              help="Global crop size (2 per image)." + _recipe_default("global_size"))
@click.option("--local-size", type=click.IntRange(min=16), help="Local crop size." + _recipe_default("local_size"))
@click.option("--local-crops", type=click.IntRange(min=0),
              help="Local crops per image." + _recipe_default("local_crops"))
@click.option("--global-scale", callback=_pair, help="Area range of global crops." + _recipe_default("global_scale"))
@click.option("--local-scale", callback=_pair, help="Area range of local crops." + _recipe_default("local_scale"))
@click.option("--channel-dropout", type=click.FloatRange(0, 1),
              help="Probability of zeroing a channel of a crop (never the protein channel)."
                   + _recipe_default("channel_dropout"))
@click.option("--normalize", type=click.Choice(NORMALIZE),
              help="Crops standardized with their whole image's channel mean / std (image), or its 1-99.8% range "
                   "mapped to 0-1 (percentile), or the data set's 1-99.8% range per channel mapped to 0-1 (dataset: "
                   "keeps brightness differences between images; estimated from a sample of up to 256 images, "
                   "reported on stderr); recorded in the checkpoint, so embed uses the same."
                   + _recipe_default("normalize"))
@click.option("--embed-size", type=click.IntRange(min=0), metavar="SIZE",
              help="The view size (0: native) that embed, finetune and predict use with this checkpoint unless "
                   "given --size." + _recipe_default("embed_size"))
@click.option("--embed-pool", type=click.Choice(POOLINGS),
              help="The pooling that embed, finetune and predict use with this checkpoint unless given --pool."
                   + _recipe_default("embed_pool"))
@click.option("--no-pack", is_flag=True, help="Run the transformer once per crop size (DINO's way) instead of one packed pass.")
@click.option("--koleo", type=click.FloatRange(min=0), metavar="W",
              help="Weight of DINOv2's KoLeo regularizer: pushes each student CLS feature of a global crop away from "
                   "its nearest neighbour in the batch, spreading features apart (DINOv2: 0.1; 0: off)."
                   + _recipe_default("koleo"))
@click.option("--centering", type=click.Choice(CENTERINGS),
              help="Teacher targets: softmax after subtracting a running mean (center, DINO) or Sinkhorn-Knopp "
                   "(sinkhorn, DINOv2), which gives every output dimension an equal share of each batch."
                   + _recipe_default("centering"))
@click.option("--ibot", type=click.FloatRange(min=0), metavar="W",
              help="Weight of iBOT's masked-patch loss: the student sees some global crops with blocks of patches "
                   "replaced by a learned mask token and predicts the teacher's outputs there (DINOv2: 1.0; 0: off)."
                   + _recipe_default("ibot"))
@click.option("--mask-ratio", callback=_pair, metavar="LOW,HIGH",
              help="With --ibot: range of the share of a masked crop's patches that are masked (DINOv2's)."
                   + _recipe_default("mask_ratio"))
@click.option("--mask-prob", type=click.FloatRange(0, 1, min_open=True),
              help="With --ibot: share of the global crops that are masked (DINOv2's)." + _recipe_default("mask_prob"))
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, help="Steps between checkpoints.")
@click.option("--log", "log_path", metavar="FILE.jsonl", default=None, help="Append per-step metrics as JSON lines.")
@click.option("--seed", type=int, default=0, help="Seed of initialization, data order and augmentation.")
@click.option("--force", is_flag=True, help="Overwrite CKPT and start afresh.")
@data_options
@device_option
@common
@click.pass_context
def pretrain_command(ctx, data, output, resume, init, stop_at, checkpoint_every, log_path, workers, on_error, force,
                     max_pixels, device, quiet, **run_settings):  # run_settings: read by _config(ctx)
    """DINO self-supervised pretraining: a backbone that knows your cells, without labels.

    DATA: TIFF files, directories and - (paths on stdin). Runs on many GPUs or nodes with
    `torchrun --nproc-per-node N -m protloc -- pretrain ...` (only rank 0 writes).

    \b
    protloc pretrain cells/ -o dino.pt --recipe small --steps 600       # a few thousand images, a CPU
    protloc pretrain cells/ -o dino.pt --arch vit_small --epochs 100 --log train.jsonl
    protloc pretrain cells/ -o dino.pt --resume      # continue after a stop or crash
    """
    cfg = _config(ctx)
    if resume:
        if init is not None:
            raise click.UsageError("--resume continues a run; --init starts one: give one of them")
        recorded = recorded_config(output)
        check_resume(recorded, cfg, _given_flags(ctx), output)
        cfg = recorded  # flags left out take the recorded values
    else:
        if (cfg.steps is None) == (cfg.epochs is None):
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
        if trainer.dataset_stats_estimated is not None and world.is_main and not quiet:
            click.echo(f"protloc: {trainer.dataset_stats_estimated.describe()}", err=True)
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


next(p for p in pretrain_command.params if p.name == "recipe").help = _recipes_help(pretrain_command)
