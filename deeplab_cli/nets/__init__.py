"""PyTorch network definitions, looked up by the registry's ``arch`` names.

Each builder takes ``num_classes`` plus the row's ``arch_options`` and returns a module that maps a
normalised N x 3 x H x W batch to logits at the network's output stride. Modules are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from deeplab_cli.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

    from deeplab_cli.zoo import ModelSpec

# arch name -> (module, builder function)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "deeplabv3-mobilenetv2": ("deeplab_cli.nets.deeplab_mobile", "deeplabv3_mobilenetv2"),
    "deeplabv3plus-mobilenetv2": ("deeplab_cli.nets.deeplab_mobile", "deeplabv3plus_mobilenetv2"),
    "deeplabv3plus-mobilenetv3": ("deeplab_cli.nets.deeplab_mobile", "deeplabv3plus_mobilenetv3"),
    "deeplab-v1-largefov": ("deeplab_cli.nets.vgg", "deeplab_v1_largefov"),
    "deeplab-v2-vgg16": ("deeplab_cli.nets.vgg", "deeplab_v2_vgg16"),
    "deeplab-v2-resnet101": ("deeplab_cli.nets.resnet", "deeplab_v2_resnet101"),
    "fcn8s": ("deeplab_cli.nets.fcn", "fcn8s"),
}


def build_arch(arch: str, num_classes: int, **options: Any) -> nn.Module:
    """Build an untrained network of architecture ``arch``."""
    if arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    module_name, builder = ARCHITECTURES[arch]
    return getattr(importlib.import_module(module_name), builder)(num_classes=num_classes, **options)


def build(spec: ModelSpec) -> nn.Module:
    """Build the (untrained) network a registry row describes."""
    return build_arch(spec.arch, spec.num_classes, **spec.arch_options)
