"""deeplab-cli: semantic image segmentation with DeepLab models, from the shell and from Python."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Busy-waiting OpenMP threads make torch (CRF, conversion) many times slower when cores are shared with
# ONNX Runtime or other processes; passive waiting costs nothing measurable when they are not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["Segmenter", "CRFParams", "refine", "__version__"]

if TYPE_CHECKING:
    from deeplab_cli.crf import CRFParams, refine
    from deeplab_cli.runtime import Segmenter

_LAZY = {
    "Segmenter": "deeplab_cli.runtime",
    "CRFParams": "deeplab_cli.crf",
    "refine": "deeplab_cli.crf",
}


def __getattr__(name: str) -> Any:
    """Import the heavy parts (onnxruntime, torch) only when they are used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deeplab_cli' has no attribute {name!r}")
