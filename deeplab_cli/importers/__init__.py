"""Readers of released weight formats and their mapping onto ``deeplab_cli.nets``.

Each importer is ``load(path, spec) -> torch.nn.Module``: it builds the network for ``spec`` and fills
every parameter from the file, failing with a :class:`~deeplab_cli.errors.WeightsError` that names the
tensor or layer when the file does not fit the architecture.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from deeplab_cli.errors import WeightsError

if TYPE_CHECKING:
    from torch import nn

    from deeplab_cli.zoo import ModelSpec

# source format -> (module, loader function)
IMPORTERS: dict[str, tuple[str, str]] = {
    "tflite": ("deeplab_cli.importers.tflite", "load_tflite"),
    "caffe": ("deeplab_cli.importers.caffe", "load_caffemodel"),
}


def load_weights(path: Path, spec: ModelSpec, source_format: str | None = None) -> nn.Module:
    """Build ``spec``'s network and load the weights in ``path`` (format from the spec unless given)."""
    fmt = source_format or (spec.source.format if spec.source else None)
    if fmt not in IMPORTERS:
        raise WeightsError(f"no importer for weight format {fmt!r} (known: {', '.join(IMPORTERS)})")
    module_name, loader = IMPORTERS[fmt]
    net = getattr(importlib.import_module(module_name), loader)(Path(path), spec)
    return net.eval()
