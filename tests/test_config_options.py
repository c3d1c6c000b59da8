"""Pretraining settings are declared once, in PretrainConfig / MultiCropConfig (protloc.setting):
`protloc pretrain` builds each setting's flag from its field (help, accepted values), leaves its
default to the --recipe, and derives which flags define a run; the other commands take their
choices (normalize, patch, architecture) from the library."""

import dataclasses

import click
import pytest
from click.testing import CliRunner

from protloc.augment import NORMALIZE, MultiCropConfig
from protloc.cli import main
from protloc.cli.pretrain import RUN_INDEPENDENT, _config, _recipe_default, _settings, pretrain_command
from protloc.data import NORMALIZATIONS
from protloc.model import PATCHES, ViTConfig
from protloc.pretrain import PretrainConfig
from protloc.recipes import FIELDS, RECIPES, settings

OPTIONS = {p.name: p for p in pretrain_command.params}
FLAGGED = {name: f for name, f in FIELDS.items() if "help" in f.metadata}  # settings with a flag built from them


def resolved(*args) -> PretrainConfig:
    with pretrain_command.make_context("pretrain", ["data", "-o", "x.pt", *args]) as ctx:
        return _config(ctx)


def help_text(*command) -> str:
    return " ".join(CliRunner().invoke(main, [*command, "--help"]).output.split()).replace("- ", "-")


def test_the_settings_are_every_field_of_both_configs_but_the_crops_own_normalize():
    crops = {f.name for f in dataclasses.fields(MultiCropConfig)} - {"normalize"}
    run = {f.name for f in dataclasses.fields(PretrainConfig)} - {"crops"}
    assert set(FIELDS) == crops | run and not crops & run
    assert set(settings(PretrainConfig())) == set(FIELDS)


def test_every_flagged_field_has_one_option_whose_help_is_the_fields_with_each_recipes_value():
    text = help_text("pretrain")
    for name, field in FLAGGED.items():
        option = OPTIONS[name]
        assert option.default is None  # left out: the recipe's value
        assert " ".join(option.help.split()).startswith(field.metadata["help"])
        if not option.is_bool_flag or option.secondary_opts:
            assert option.help.endswith(_recipe_default(name))
        assert " ".join(field.metadata["help"].split()).replace("- ", "-")[:60] in text
    assert _recipe_default("steps") == "" and "Default: 0 (every --recipe)." in OPTIONS["seed"].help
    assert "Default: the --recipe's: dino 0 (native), small 64." in OPTIONS["embed_size"].help


def test_a_flags_accepted_values_are_those_its_field_declares():
    for name, field in FLAGGED.items():
        meta, option = field.metadata, OPTIONS[name]
        if "choices" in meta:
            assert list(option.type.choices) == list(meta["choices"])
            for choice in meta["choices"]:  # every choice is a value of the setting
                assert settings(resolved(option.opts[0], str(choice)))[name] == choice
        for bound in ("min", "max"):
            if bound in meta:
                assert getattr(option.type, bound) == meta[bound]
                assert getattr(option.type, f"{bound}_open") == meta.get(f"{bound}_open", False)
    assert list(OPTIONS["normalize"].type.choices) == list(NORMALIZE)


@pytest.mark.parametrize("args", [["--out-dim", "1"], ["--drop-path", "1"], ["--mask-prob", "0"],
                                  ["--teacher-temp", "0"], ["--global-size", "15"], ["--channel-dropout", "1.5"],
                                  ["--normalize", "imagenet"], ["--centering", "mean"], ["--global-scale", "0,1"]],
                         ids=lambda a: a[0])
def test_a_value_outside_the_fields_range_is_a_usage_error(tmp_path, args):
    result = CliRunner().invoke(main, ["pretrain", str(tmp_path), "-o", str(tmp_path / "p.pt"), "--steps", "1", *args])
    assert result.exit_code == 2 and args[0] in result.output and not (tmp_path / "p.pt").exists()


def test_flags_left_out_take_the_recipes_values_and_given_ones_replace_them():
    for name, recipe in RECIPES.items():
        assert resolved("--recipe", name) == recipe
    cfg = resolved("--pack", "off", "--embed-size", "0", "--patch", "16", "--mask-ratio", "0.2,0.3", "--seed", "7")
    assert (cfg.pack, cfg.embed_size, cfg.patch, cfg.mask_ratio, cfg.seed) == ("off", None, 16, (0.2, 0.3), 7)


def test_the_flags_that_define_a_run_are_those_named_after_a_setting():
    flags = {max(p.opts, key=len): p.name for p in pretrain_command.params if p.opts[0].startswith("-")}
    assert {flag for flag, name in flags.items() if name in FIELDS} == set(_settings(PretrainConfig()))
    assert RUN_INDEPENDENT == {flag for flag, name in flags.items() if name not in FIELDS}
    assert {"--output", "--resume", "--workers", "--on-error", "--max-pixels", "--device"} <= RUN_INDEPENDENT
    # a --no-x switch shows as the flag gives it; every other flag as its setting's value
    shown = _settings(dataclasses.replace(PretrainConfig(), pack="off", use_bn_in_head=True))
    assert (shown["--pack"], shown["--use-bn-in-head"], shown["--global-scale"]) == ("off", True, (0.4, 1.0))
    assert _settings(PretrainConfig())["--pack"] == "auto"


@pytest.mark.parametrize("command", ["embed", "finetune", "predict", "plot attention"])
def test_other_commands_take_normalize_choices_from_the_library(command):
    cli = main
    for name in command.split():
        cli = cli.get_command(None, name)
    normalize = next(p for p in cli.params if p.name == "normalize")
    assert list(normalize.type.choices) == list(NORMALIZATIONS)


@pytest.mark.parametrize("command", ["embed", "finetune"])
def test_a_random_backbones_architecture_defaults_are_the_models(command):
    options = {p.name: p for p in main.get_command(None, command).params}
    assert [options[k].default for k in ("arch", "patch", "layout", "depth")] == \
        [ViTConfig.arch, ViTConfig.patch, ViTConfig.layout, ViTConfig.depth]
    assert list(options["patch"].type.choices) == list(PATCHES)
    assert isinstance(options["patch"].type, click.Choice)
