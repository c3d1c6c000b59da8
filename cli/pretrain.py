"""`protloc pretrain`: DINO self-supervised pretraining on a folder of TIFFs."""

import dataclasses
import sys
import time
import typing

import click
from click.core import ParameterSource
from tqdm import tqdm

from protloc import distributed
from protloc.augment import MultiCropConfig
from protloc.cli.options import architecture_options, common, data_options, device_option, show_progress, zarr_level
from protloc.cli.progress import status_line
from protloc.cli.signals import Stopped, stop_after_step
from protloc.data import ViewOptions
from protloc.errors import ProtlocError
from protloc.output import check_destination
from protloc.pretrain import PretrainConfig, Trainer, recorded_config
from protloc.recipes import DEFAULT, FIELDS, RECIPES, changes, resolve, settings
from protloc.sources import discover


def _switch(param: click.Parameter) -> bool:
    """Whether `param` is a --no-x switch, which sets its setting to False."""
    return param.is_bool_flag and not param.secondary_opts and param.opts[0].startswith("--no-")


def _settings(cfg: PretrainConfig) -> dict[str, object]:
    """The value of every flag that defines a run (all but RUN_INDEPENDENT), as `cfg` records it
    (a --no-x switch: whether it is given)."""
    values = settings(cfg)
    return {max(p.opts, key=len): not values[p.name] if _switch(p) else values[p.name]
            for p in pretrain_command.params if p.name in values}


GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
HINTS = {**typing.get_type_hints(MultiCropConfig), **typing.get_type_hints(PretrainConfig)}  # each setting's type


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
    if all(settings(cfg)[name] is None for cfg in RECIPES.values()):  # none: the run needs it (--steps)
        return ""
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
            return (option.opts if value != _switch(option) else option.secondary_opts)[0]
        return f"{max(option.opts, key=len)} {_show(value)}"
    small = " ".join(flag(k, v) for k, v in changes("small").items())
    return ("A whole set of settings (protloc/recipes.py); each flag given replaces one of them. dino: the DINO "
            "reference's, made for ImageNet on many GPUs. small (the default): for a few hundred to a few hundred "
            f"thousand images on a CPU or one GPU: dino's except {small}.")


def _config(ctx) -> PretrainConfig:
    """The run's settings: those of the --recipe, each replaced by its flag's value when the flag is given."""
    given = {name: value for name, value in ctx.params.items()
             if name in FIELDS and ctx.get_parameter_source(name) in GIVEN}
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


def _option(name: str, field: dataclasses.Field):
    """The flag of setting `name` as its field declares it (protloc.setting), with default None:
    a flag left out takes the --recipe's value, which the help gives."""
    meta, kind = field.metadata, HINTS[name]
    flag = meta.get("flag", "--" + name.replace("_", "-"))
    text = meta["help"] + _recipe_default(name)
    if kind is bool:  # --a/--no-b sets either value; --no-x only False, and its help gives no default
        if "/" in flag:
            return click.option(flag, name, default=None, help=text)
        return click.option(flag, name, flag_value=False, default=None, help=meta["help"])
    if typing.get_origin(kind) is tuple:
        return click.option(flag, name, default=None, callback=_pair, metavar=meta.get("metavar"), help=text)
    bounds = {k: meta[k] for k in ("min", "max", "min_open", "max_open") if k in meta}
    number = int if int in (typing.get_args(kind) or (kind,)) else float
    kind = (click.Choice(meta["choices"]) if "choices" in meta else
            ({int: click.IntRange, float: click.FloatRange}[number](**bounds) if bounds else number))
    return click.option(flag, name, type=kind, default=None, metavar=meta.get("metavar"), help=text,
                        callback=(lambda _c, _p, v: v or None) if meta.get("zero_is_none") else None)


def setting_options(f):
    """A flag for every setting whose field has help (protloc.setting), in the fields' order."""
    for name, field in reversed(FIELDS.items()):  # click lists options in the order of the decorators
        if "help" in field.metadata:
            f = _option(name, field)(f)
    return f


@click.command("pretrain")
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", required=True, metavar="CKPT", help="The checkpoint to write (and to --resume from).")
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
@setting_options
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, help="Steps between checkpoints.")
@click.option("--log", "log_path", metavar="FILE.jsonl", default=None, help="Append per-step metrics as JSON lines.")
@click.option("--force", is_flag=True, help="Overwrite CKPT and start afresh.")
@data_options
@device_option
@common
@click.pass_context
def pretrain_command(ctx, data, output, resume, init, stop_at, checkpoint_every, log_path, workers, on_error, force,
                     max_pixels, device, quiet, **run_settings):  # run_settings: read by _config(ctx)
    """DINO self-supervised pretraining: a backbone that knows your cells, without labels.

    DATA: TIFF files, OME-Zarr, CSV manifests, directories and - (paths on stdin). Runs on many GPUs or nodes with
    `torchrun --nproc-per-node N -m protloc -- pretrain ...` (only rank 0 writes).

    \b
    protloc pretrain cells/ -o dino.pt --steps 1200     # recipe small: up to ~10^5 images, a CPU or one GPU
    protloc pretrain cells/ -o dino.pt --recipe dino --epochs 100 --log train.jsonl   # many images, many GPUs
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
        view = ViewOptions(max_pixels=max_pixels, zarr_level=zarr_level(ctx))
        trainer = Trainer(sources, cfg, output, world=world, view=view, workers=workers,
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
# flags that leave the run as it is (no setting of that name): --resume accepts any value of them
# (--on-error and --max-pixels decide whether a bad or huge image stops the run, never what an image reads as)
RUN_INDEPENDENT = {max(p.opts, key=len) for p in pretrain_command.params if p.opts[0].startswith("-")} \
    - set(_settings(PretrainConfig()))
