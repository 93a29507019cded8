"""The ``deeplab`` command: a thin click group whose subcommands live in ``deeplab_cli.commands``.

Subcommand modules are imported only when invoked, so ``deeplab --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

import click

from deeplab_cli import __version__
from deeplab_cli.errors import DeeplabError

# command name -> (module under deeplab_cli.commands, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "segment": ("segment", "segment", "Segment images, folders or a list on stdin into masks."),
    "eval": ("evaluate", "evaluate", "Evaluate a model on a dataset split: mIoU, per class, trimap."),
    "models": ("models", "models", "List the models in the registry and which are ready."),
    "weights": ("weights", "weights", "Fetch or import pretrained weights into the cache."),
    "export": ("export", "export", "Export a model to an ONNX file."),
    "crf": ("crf", "crf", "Dense CRF tools: refine score maps, tune parameters."),
    "data": ("data", "data", "Download and prepare datasets."),
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[cmd_name]
        module = importlib.import_module(f"deeplab_cli.commands.{module_name}")
        return getattr(module, attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, _, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deeplab")
def cli() -> None:
    """Semantic image segmentation with DeepLab models (ONNX Runtime, dense CRF)."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning library errors into one line on stderr and an exit code."""
    try:
        code = cli.main(args=argv, prog_name="deeplab", standalone_mode=False)
        if isinstance(code, int) and code:  # ctx.exit(n) returns n when standalone_mode is off
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("deeplab: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except DeeplabError as exc:
        click.echo(f"deeplab: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("deeplab: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)
    except OSError as exc:  # disk full, permissions, ...: one line, not a traceback
        click.echo(f"deeplab: error: {exc}", err=True)
        sys.exit(1)
