"""The fully connected CRF (Krähenbühl & Koltun 2011) as DeepLab uses it.

``refine(image, probs, params)`` returns CRF-refined probabilities. Backends (:data:`BACKENDS`): ``numba``
(the compiled exact permutohedral lattice, the default on the CPU when installed), ``torch`` (our lattice
in PyTorch, CPU or CUDA, see :mod:`.lattice` and :mod:`.torch_backend`) and ``pydensecrf`` (the reference
C++ code via the optional ``pydensecrf2`` package); ``auto`` picks one. Parameters live in :mod:`.params`
(``CRFParams``, ``resolve``); :class:`.runner.CRFRunner` runs the CRF next to inference (inline, worker
processes or batched on a GPU) for ``segment``, ``eval`` and ``crf tune``.
"""

from .backends import BACKENDS, BackendUnavailableError, available_backends
from .core import CRFInputError, refine, refine_batch
from .params import CRFParams, CRFParamsError

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "CRFInputError",
    "CRFParams",
    "CRFParamsError",
    "available_backends",
    "refine",
    "refine_batch",
]
