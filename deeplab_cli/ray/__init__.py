"""Ray Data integration: ``deeplab segment --engine ray`` and :func:`segment_dataset` for Ray pipelines.

Ray is the optional ``[ray]`` extra; this package imports it only when used.
"""

from deeplab_cli.ray.cluster import INSTALL_HINT, RayMissingError, connected, require_ray
from deeplab_cli.ray.dataset import segment_dataset
from deeplab_cli.ray.engine import RayOptions, RayPipeline, command_engine, segment_files_ray

__all__ = [
    "INSTALL_HINT",
    "RayMissingError",
    "RayOptions",
    "RayPipeline",
    "command_engine",
    "connected",
    "require_ray",
    "segment_dataset",
    "segment_files_ray",
]
