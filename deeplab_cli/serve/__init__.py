"""``deeplab serve``: the models over HTTP (the ``[serve]`` extra: FastAPI, uvicorn, python-multipart).

- :mod:`.config`: :class:`ServeConfig`, the limits.
- :mod:`.app`: :func:`create_app` (routes, admission gate, one-line JSON errors).
- :mod:`.segment`: one request's query, body and work (the library's one segmentation path).
- :mod:`.pool`: inference threads behind a bounded queue; :mod:`.models`: loading and readiness;
  :mod:`.metrics`: the Prometheus text; :mod:`.server`: uvicorn with a draining SIGTERM.

Importing this package needs the extra; :func:`require_extra` says how to get it in one line.
"""

from __future__ import annotations

from importlib.util import find_spec

from deeplab_cli.errors import UsageError

EXTRA_HINT = 'pip install "deeplab-cli[serve]"'
_MODULES = ("fastapi", "uvicorn", "multipart")


def require_extra() -> None:
    """Raise a usage error naming the pip command when the ``[serve]`` extra is not installed."""
    missing = [name for name in _MODULES if find_spec(name) is None]
    if missing:
        names = ", ".join("python-multipart" if name == "multipart" else name for name in missing)
        raise UsageError(f"deeplab serve needs {names}: {EXTRA_HINT}")
