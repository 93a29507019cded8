"""The CRF backend names, written once, and which of them this environment can run.

``auto`` is ``numba`` (the compiled exact lattice) on the CPU when numba is installed, else ``torch``; on a
CUDA device it is ``torch``. ``numba`` and ``pydensecrf`` run on the CPU only; ``torch`` on either.
A backend that is asked for by name and not installed is a :class:`BackendUnavailableError` (a usage
error, exit 2) naming the pip command, raised before any work starts.
"""

from __future__ import annotations

import importlib.util

from deeplab_cli.errors import UsageError

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "choose_backend",
    "install_hint",
    "is_installed",
]

BACKENDS: tuple[str, ...] = ("auto", "numba", "torch", "pydensecrf")
CPU_ONLY = ("numba", "pydensecrf")
_INSTALL = {"numba": "pip install numba", "pydensecrf": 'pip install "deeplab-cli[crf]"'}


class BackendUnavailableError(UsageError):
    """The CRF backend asked for is unknown or not installed (exit 2, before any image is read)."""


def install_hint(backend: str) -> str:
    """The pip command that makes ``backend`` available."""
    return _INSTALL.get(backend, "pip install deeplab-cli")


def is_installed(backend: str) -> bool:
    """Whether the concrete ``backend`` can run here (imports nothing heavy unless needed)."""
    if backend == "torch":
        return importlib.util.find_spec("torch") is not None
    if backend == "pydensecrf":
        from .pydensecrf_backend import is_available

        return is_available()
    if backend == "numba":
        if importlib.util.find_spec("deeplab_cli.crf.numba_backend") is None:
            return False
        try:
            from . import numba_backend
        except ImportError:
            return False
        return bool(numba_backend.is_available())
    return False


def available_backends() -> list[str]:
    """The concrete backends usable in this environment, in order of preference on the CPU."""
    return [name for name in BACKENDS if name != "auto" and is_installed(name)]


def choose_backend(backend: str, on_cuda: bool = False) -> str:
    """Resolve ``auto`` and check that the backend is known and installed; returns a concrete name."""
    name = (backend or "auto").strip().lower()
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown CRF backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if name == "auto":
        return "torch" if on_cuda or not is_installed("numba") else "numba"
    if not is_installed(name):
        raise BackendUnavailableError(f"the CRF backend {name!r} is not installed: {install_hint(name)}")
    return name
