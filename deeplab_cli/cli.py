"""The ``deeplab`` command: a thin click group whose subcommands live in ``deeplab_cli.commands``.

Subcommand modules are imported only when invoked, so ``deeplab --help`` stays fast. :func:`main` is the
one place where failures become one line on stderr and an exit code (0 ok, 1 some work failed, 2 usage,
130 interrupted, 141 stdout closed); no traceback reaches a user (``DEEPLAB_DEBUG=1`` shows them).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator
from types import FrameType

import click

from deeplab_cli import __version__
from deeplab_cli.errors import DeeplabError, StdoutClosed

ISSUES_URL = "https://github.com/deeplab-cli/deeplab-cli/issues"

# command name -> (module under deeplab_cli.commands, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "segment": ("segment", "segment", "Segment images, folders or a list on stdin into masks."),
    "eval": ("evaluate", "evaluate", "Evaluate a model on a dataset split: mIoU, per class, trimap."),
    "models": ("models", "models", "List the models in the registry and which are ready."),
    "weights": ("weights", "weights", "Fetch or import pretrained weights into the cache."),
    "export": ("export", "export", "Export a model to an ONNX file."),
    "crf": ("crf", "crf", "Dense CRF tools: tune the CRF parameters on a dataset split."),
    "data": ("data", "data", "Download and prepare datasets."),
    "serve": ("serve", "serve", "Serve models over HTTP (needs the [serve] extra)."),
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
    """Semantic image segmentation with DeepLab models (ONNX Runtime, dense CRF).

    \b
    Exit status: 0 done, 1 some work failed, 2 usage error, 130 interrupted (Ctrl-C or SIGTERM).
    """


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM (batch schedulers, ``kill``) stop any command like Ctrl-C: in-flight writes finish or
    are removed, worker processes are closed, exit 130."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail on a closed pipe."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown: after an interrupt every output is complete and the
    workers are stopped, and tearing down torch and numba can take seconds of a user's Ctrl-C."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every failure into one line on stderr and an exit code."""
    if not sys.warnoptions:  # library warnings (Pillow's, numpy's) are not messages for a CLI user
        warnings.simplefilter("ignore")
    try:
        with sigterm_as_interrupt():
            code = cli.main(args=argv, prog_name="deeplab", standalone_mode=False)
        if isinstance(code, int) and code:  # ctx.exit(n) returns n when standalone_mode is off
            sys.exit(code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("deeplab: interrupted", err=True)
        _exit_now(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (StdoutClosed, BrokenPipeError):
        _quiet_stdout()
        sys.exit(141)
    except DeeplabError as exc:
        click.echo(f"deeplab: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # disk full, permissions, ...: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"deeplab: error: {where}{exc.strerror or exc}", err=True)
        sys.exit(1)
    except MemoryError:
        click.echo("deeplab: error: out of memory", err=True)
        sys.exit(1)
    except Exception as exc:  # a bug: one line, the traceback only on request
        if os.environ.get("DEEPLAB_DEBUG"):
            traceback.print_exc()
        click.echo(
            f"deeplab: internal error: {type(exc).__name__}: {exc} (please report it at {ISSUES_URL}; "
            "DEEPLAB_DEBUG=1 shows the traceback)",
            err=True,
        )
        sys.exit(1)
