"""``deeplab data``: download and prepare datasets (``deeplab data fetch voc``)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def data() -> None:
    """Download and prepare datasets."""


@data.command()
@click.argument("dataset", type=click.Choice(["voc"]))
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder to unpack into (default: $DEEPLAB_DATA, else <cache>/data).",
)
@click.option(
    "--url", default=None, help="Archive URL (http, https or file://); default: the official VOC site."
)
@click.option(
    "--sha256", default=None, help="Expected sha256 of the archive (replaces the official md5 check)."
)
@click.option("--md5", default=None, help="Expected md5 of the archive (default: the official VOC 2012 md5).")
@click.option("--keep-archive", is_flag=True, help="Keep the downloaded tar after unpacking it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def fetch(
    dataset: str,
    root: Path | None,
    url: str | None,
    sha256: str | None,
    md5: str | None,
    keep_archive: bool,
    quiet: bool,
) -> None:
    """Download and unpack DATASET (voc: PASCAL VOC 2012 trainval, about 2 GB).

    Resumes an interrupted download, verifies the checksum, refuses unsafe archive members, and does
    nothing when the data is already unpacked. Then: deeplab eval --dataset voc --split val
    """
    from deeplab_cli.datasets import default_data_root
    from deeplab_cli.datasets.fetch import VOC_MD5, VOC_URL, fetch_voc

    target = root if root is not None else default_data_root()
    folder = fetch_voc(
        target,
        url or VOC_URL,
        sha256=sha256,
        md5=md5 or (None if sha256 else VOC_MD5),
        keep_archive=keep_archive,
        progress=not quiet,
    )
    click.echo(str(folder))
