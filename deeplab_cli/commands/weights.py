"""``deeplab weights``: bring pretrained weights into the cache (download, mirror or local file)."""

from __future__ import annotations

from pathlib import Path

import click

from deeplab_cli import paths
from deeplab_cli import weights as cache
from deeplab_cli.zoo import get_model, registry_models

MIRROR_HELP = "Folder searched (recursively) for released files before any download; also $DEEPLAB_MIRROR."


@click.group("weights")
def weights() -> None:
    """Fetch or import pretrained weights into the cache ($DEEPLAB_HOME)."""


@weights.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--all", "fetch_all", is_flag=True, help="Fetch every registry model that has a download URL.")
@click.option("--mirror", type=click.Path(file_okay=False, path_type=Path), multiple=True, help=MIRROR_HELP)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def fetch(names: tuple[str, ...], fetch_all: bool, mirror: tuple[Path, ...], quiet: bool) -> None:
    """Download NAME's released file, verify its sha256 and convert it to ONNX.

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
    for name in names:
        path = cache.fetch(name, mirrors=list(mirror), progress=not quiet)
        click.echo(f"{name}: {path}")


@weights.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
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
def import_(
    file: Path, arch: str | None, name: str | None, classes_file: Path | None, source_format: str | None
) -> None:
    """Import a local weight file offline: identified by its sha256, or with --arch and --name.

    \b
    Examples:
      deeplab weights import lite-model_mobilenetv2-coco_dr_1.tflite
      deeplab weights import train2_iter_8000.caffemodel
      deeplab weights import mine.caffemodel --arch deeplab-v1-largefov --name my-model --classes cls.txt
    """
    if name and not arch:
        raise click.UsageError("--name goes with --arch (a known file takes its registry name)")
    request = cache.ImportRequest(
        arch=arch, name=name, classes_file=classes_file, source_format=source_format
    )
    for spec in cache.import_file(file, request):
        click.echo(f"{spec.name}: {cache.onnx_path(spec)}")


@weights.command("path")
@click.argument("name", required=False)
def path(name: str | None) -> None:
    """Print the cache folder, or the cached ONNX file of NAME."""
    click.echo(cache.onnx_path(get_model(name)) if name else paths.home())
