"""``deeplab models``: the registry as a table or JSON, marking the models ready in the cache."""

from __future__ import annotations

import json

import click

from deeplab_cli import paths, weights
from deeplab_cli.zoo import ModelSpec, list_models


def model_record(spec: ModelSpec) -> dict:
    """What ``deeplab models --json`` prints for one model."""
    return {
        "name": spec.name,
        "description": spec.description,
        "arch": spec.arch,
        "dataset": spec.dataset,
        "num_classes": spec.num_classes,
        "output_stride": spec.output_stride,
        "source_format": spec.source.format if spec.source else None,
        "weights": spec.source.weights if spec.source else None,
        "url": spec.source.url if spec.source else None,
        "sha256": spec.source.sha256 if spec.source else None,
        "licence": spec.licence,
        "reported": spec.reported,
        "measured": spec.measured,
        "crf": spec.crf,
        "default": spec.default,
        "user": spec.user,
        "ready": weights.is_ready(spec),
    }


def _accuracy(spec: ModelSpec) -> str:
    """The reported mIoU, or the CRF one when upstream reported only that (DeepLab v2's test server)."""
    split = spec.reported.get("split", "")
    if spec.reported.get("miou") is not None:
        return f"{spec.reported['miou']:.2f} ({split})"
    if spec.reported.get("miou_crf") is not None:
        return f"{spec.reported['miou_crf']:.2f} with CRF ({split})"
    return "-"


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per model (JSON lines).")
def models(as_json: bool) -> None:
    """List the models in the registry and which are ready in the cache.

    \b
    Example:
      deeplab models
      deeplab models --json | python -c "import json,sys; print([json.loads(l)['name'] for l in sys.stdin])"
    """
    records = [model_record(spec) for spec in list_models()]
    if as_json:
        for record in records:
            click.echo(json.dumps(record))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    table = Table(title=f"deeplab models (cache: {paths.home()})")
    for column in ("model", "dataset", "classes", "weights", "reported mIoU", "ready"):
        table.add_column(column)
    for spec, record in zip(list_models(), records, strict=True):
        name = f"{spec.name} (default)" if spec.default else spec.name
        ready = "yes" if record["ready"] else "-"
        weights_kind = f"{record['source_format']} {record['weights'] or ''}".strip()
        table.add_row(name, spec.dataset, str(spec.num_classes), weights_kind, _accuracy(spec), ready)
    console.print(table)
