"""``deeplab export``: write a model as an ONNX file with dynamic batch, height and width."""

from __future__ import annotations

from pathlib import Path

import click

from deeplab_cli import weights


@click.command("export")
@click.argument("name")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Output .onnx file (or an existing folder).",
)
@click.option(
    "--fp16", is_flag=True, help="Store weights and compute in float16 (inputs/outputs stay float32)."
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No conversion notices.")
def export(name: str, output: Path, fp16: bool, force: bool, quiet: bool) -> None:
    """Export model NAME to ONNX.

    The graph takes `image` float32 [N,3,H,W] (RGB, 0..255; it normalises itself) and returns `logits`
    [N,C,h,w] at the model's output stride; the model's classes and protocol are in its metadata.

    \b
    Example:
      deeplab export deeplabv3-mnv2-voc -o deeplabv3.onnx
      deeplab export deeplabv3-mnv2-voc -o deeplabv3-fp16.onnx --fp16
    """
    if quiet:
        weights.set_notice(None)
    click.echo(weights.export_model(name, output, fp16=fp16, overwrite=force))
