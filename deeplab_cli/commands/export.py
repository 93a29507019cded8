"""``deeplab export``: write a model as an ONNX file with dynamic batch, height and width."""

from __future__ import annotations

from pathlib import Path

import click

from deeplab_cli.weights import export_model


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
def export(name: str, output: Path, fp16: bool) -> None:
    """Export model NAME to ONNX.

    The graph takes `image` float32 [N,3,H,W] (RGB, 0..255; it normalises itself) and returns `logits`
    [N,C,h,w] at the model's output stride; the model's classes and protocol are in its metadata.

    \b
    Example:
      deeplab export deeplabv3-mnv2-voc -o deeplabv3.onnx
    """
    click.echo(export_model(name, output, fp16=fp16))
