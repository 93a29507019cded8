"""The fully connected CRF (Krähenbühl & Koltun 2011) as DeepLab uses it.

``refine(image, probs, params)`` returns CRF-refined probabilities. Backends: ``torch`` (default; our
permutohedral lattice in PyTorch, CPU or CUDA, see :mod:`.lattice` and :mod:`.torch_backend`) and
``pydensecrf`` (the reference C++ code via the optional ``pydensecrf2`` package). For batch pipelines,
:class:`.workers.CRFWorkerPool` runs the CRF in worker processes next to inference.
"""

from .core import available_backends, refine, refine_batch
from .params import CRFParams

__all__ = ["CRFParams", "available_backends", "refine", "refine_batch"]
