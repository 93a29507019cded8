"""Ray itself: the install check, and a cluster to run on (an existing one, or a quiet local one).

Ray is an optional extra. Nothing here imports it at module level, so ``import deeplab_cli.ray`` works
without it and ``--engine ray`` can say in one line how to install it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from types import ModuleType

from deeplab_cli.errors import UsageError

INSTALL_HINT = 'pip install "deeplab-cli[ray]"'
# The local object store: Ray's default (30% of RAM) is more than a batch of masks needs on a shared machine.
LOCAL_OBJECT_STORE_BYTES = 2 * 2**30
PROBE_SECONDS = 10  # to open a TCP connection to a cluster's address before handing it to Ray


class RayMissingError(UsageError):
    """``--engine ray`` without Ray installed (exit 2)."""


def require_ray() -> ModuleType:
    """The ``ray`` module with Ray Data, or a usage error naming the install command."""
    try:
        import ray
        import ray.data  # noqa: F401  (the data extra: pyarrow, pandas)
    except ImportError:
        raise RayMissingError(f"--engine ray needs Ray Data: {INSTALL_HINT}") from None
    return ray


def quiet_ray_data() -> None:
    """No progress bars or execution banners from Ray Data on our stderr: the CLI reports progress."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.execution_options.preserve_order = True  # records come back in input order, like the local engine
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def check_reachable(address: str) -> None:
    """A usage error unless ``host:port`` (or ``ray://host:port``) accepts a TCP connection.

    Ray itself retries an address nobody listens on for minutes, printing a warning every few seconds;
    a wrong or stopped cluster should cost one line and exit 2 instead. ``auto`` is left to Ray (it
    says at once when no cluster runs here), as is anything that is not ``host:port``.
    """
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=PROBE_SECONDS):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"cannot reach the Ray cluster at {address}: {reason}") from None


@contextlib.contextmanager
def connected(address: str | None = None, num_cpus: int | None = None) -> Iterator[ModuleType]:
    """Use the Ray cluster at ``address`` (``auto``: the one ``ray start`` runs here), or start a local one.

    A cluster we started is shut down on the way out, Ctrl-C and SIGTERM included (Ray's own processes
    also die with this one if it is killed). Already connected (a user's session): use it and leave it be.
    """
    ray = require_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        quiet_ray_data()
        yield ray
        return
    common = {"logging_level": logging.ERROR, "log_to_driver": False, "configure_logging": True}
    if address:
        check_reachable(address)
    try:
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(
                address="local",  # a new Ray of our own, even where `ray start` runs one here
                num_cpus=num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                **common,
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise UsageError(f"cannot start or reach {where}: {exc}") from None
    try:
        quiet_ray_data()
        yield ray
    finally:
        ray.shutdown()
