"""The `protloc` command: a click group whose commands parse, call the library, write outputs.

Errors a user can cause arrive as ProtlocError and end as one line on stderr with exit code 1
(`--debug` shows the traceback); usage errors exit with 2 (click's convention). SIGINT and
SIGTERM end a command with one line and exit code 130 / 143 (protloc.cli.signals).
"""

import importlib
import sys
import traceback

import click

from protloc import __version__
from protloc.cli.signals import Stopped, stopped_by_signals
from protloc.errors import ProtlocError


# command -> "module:function"; imported on use, so `protloc embed` never pays for scikit-learn.
COMMANDS = {
    "synth": "protloc.cli.synth:synth_command",
    "pretrain": "protloc.cli.pretrain:pretrain_command",
    "embed": "protloc.cli.embed:embed_command",
    "merge": "protloc.cli.merge:merge_command",
    "knn": "protloc.cli.knn:knn_command",
    "finetune": "protloc.cli.finetune:finetune_command",
    "predict": "protloc.cli.predict:predict_command",
    "plot": "protloc.cli.plot:plot_command",
}


class ProtlocGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, function = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), function)

    def invoke(self, ctx):
        try:
            with stopped_by_signals():
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except ProtlocError as e:
            self._fail(ctx, f"protloc: error: {e}")
        except Stopped as e:
            self._fail(ctx, e.message, code=e.exit_code)
        except BrokenPipeError:  # the reader of our stdout went away (e.g. `| head`): nothing to say
            sys.stderr.close()
            ctx.exit(1)
        except Exception as e:  # a bug: say so in one line, the traceback under --debug
            self._fail(ctx, f"protloc: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")

    @staticmethod
    def _fail(ctx, message, code=1):
        if ctx.meta.get("protloc.debug"):
            traceback.print_exc()
        click.echo(message, err=True)
        ctx.exit(code)


@click.group(cls=ProtlocGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="protloc")
def main():
    """protloc: self-supervised ViTs (DINO) for protein localization in fluorescence microscopy.

    Data goes to stdout, everything for people to stderr. Exit codes: 0 ok, 1 error, 2 usage."""

__all__ = ["main"]
