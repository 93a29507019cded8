"""``deeplab weights``: bring pretrained weights into the cache (download, mirror or local file)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from deeplab_cli import paths
from deeplab_cli import weights as cache
from deeplab_cli.errors import DeeplabError
from deeplab_cli.zoo import get_model, registry_models

MIRROR_HELP = "Folder searched (recursively) for released files before any download; also $DEEPLAB_MIRROR."


@click.group("weights")
def weights() -> None:
    """Fetch or import pretrained weights into the cache ($DEEPLAB_HOME)."""


@weights.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--all", "fetch_all", is_flag=True, help="Fetch every registry model that has a download URL.")
@click.option("--mirror", type=click.Path(file_okay=False, path_type=Path), multiple=True, help=MIRROR_HELP)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no conversion notices.")
def fetch(names: tuple[str, ...], fetch_all: bool, mirror: tuple[Path, ...], quiet: bool) -> None:
    """Get NAME's released file, verify its sha256 and convert it to ONNX.

    A model already in the cache is checked (size and sha256) and converted again if it was damaged.
    Every model is tried; each failure is reported and the exit code is 1 when any failed.

    \b
    Example:
      deeplab weights fetch deeplabv3-mnv2-voc
      deeplab weights fetch --all --mirror /mnt/models
    """
    if fetch_all:
        names = tuple(spec.name for spec in registry_models() if spec.source and spec.source.url)
    if not names:
        raise click.UsageError("give at least one model name, or --all")
    for name in names:
        get_model(name)  # unknown names fail before any download
    if quiet:
        cache.set_notice(None)
    failed = []
    for name in names:
        try:
            onnx_file, what = cache.fetch(name, mirrors=list(mirror), progress=not quiet)
        except DeeplabError as exc:
            click.echo(f"deeplab: error: {name}: {exc}", err=True)
            failed.append(name)
            continue
        click.echo(f"{name}: {onnx_file}" + (f" ({what})" if what in ("repaired", "updated") else ""))
    if failed and len(names) > 1:
        summary = f"{len(failed)} of {len(names)} models failed: {', '.join(failed)}"
        click.echo(f"deeplab: error: {summary}", err=True)
    if failed:
        sys.exit(1)


@weights.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--arch", help="Architecture of a file no registry row knows (see `deeplab models --json`).")
@click.option("--name", help="Name for the imported model (with --arch).")
@click.option(
    "--classes",
    "classes_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Class names, one per line (with --arch; default: the architecture's dataset).",
)
@click.option(
    "--format",
    "source_format",
    type=click.Choice(["tflite", "caffe"]),
    help="Weight format (default: from the file suffix).",
)
@click.option("--quiet", "-q", is_flag=True, help="No conversion notices.")
def import_(
    files: tuple[Path, ...],
    arch: str | None,
    name: str | None,
    classes_file: Path | None,
    source_format: str | None,
    quiet: bool,
) -> None:
    """Import local weight files offline: each identified by its sha256, or one file with --arch and --name.

    Each file's models are printed as they become ready; a file that fails is reported and the others
    are still imported (exit 1 when any failed).

    \b
    Examples:
      deeplab weights import /path/to/folder/*.tflite
      deeplab weights import train_iter_20000.caffemodel train2_iter_20000.caffemodel
      deeplab weights import mine.caffemodel --arch deeplab-v1-largefov --name my-model --classes cls.txt
    """
    if name and not arch:
        raise click.UsageError("--name goes with --arch (a known file takes its registry name)")
    if quiet:
        cache.set_notice(None)
    request = cache.ImportRequest(
        arch=arch, name=name, classes_file=classes_file, source_format=source_format
    )
    results = cache.import_files(list(files), request, on_result=_report_import if len(files) > 1 else None)
    failures = [result for result in results if result.error is not None]
    if len(results) == 1:
        if failures:
            raise failures[0].error  # one file: its own message and exit code
        _report_import(results[0])
    if failures:
        names = ", ".join(str(result.path) for result in failures)
        summary = f"{len(failures)} of {len(results)} files failed to import: {names}"
        click.echo(f"deeplab: error: {summary}", err=True)
        sys.exit(1)


def _report_import(result: cache.ImportResult) -> None:
    for spec in result.specs:
        click.echo(f"{spec.name}: {cache.onnx_path(spec)}")
    if result.error is not None:
        click.echo(f"deeplab: error: {result.error}", err=True)


@weights.command("path")
@click.argument("name", required=False)
def path(name: str | None) -> None:
    """Print the cache folder, or the cached ONNX file of NAME (exit 1 if NAME is not converted yet)."""
    if not name:
        click.echo(paths.home())
        return
    spec = get_model(name)
    if not cache.is_ready(spec):
        raise cache.not_converted_error(spec)
    click.echo(cache.onnx_path(spec))
