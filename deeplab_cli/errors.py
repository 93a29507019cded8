"""Errors that the CLI turns into one clear line and an exit code."""

from __future__ import annotations


class DeeplabError(Exception):
    """A user-facing failure: the message is printed as is, prefixed with ``deeplab: error:``.

    ``exit_code`` follows the CLI's convention: 1 for failed work, 2 for usage errors.
    """

    exit_code = 1


class UsageError(DeeplabError):
    """The command line asked for something that cannot be done (unknown model, bad option value)."""

    exit_code = 2


class ModelNotFoundError(UsageError):
    """A model name that is neither in the registry nor imported into the cache."""


class WeightsError(DeeplabError):
    """A weight file is missing, corrupt, has the wrong checksum, or does not fit its architecture."""


class ImageError(DeeplabError):
    """An input image cannot be read or decoded."""


class ImageTooLargeError(ImageError):
    """An image whose header declares more pixels than the decoder's limit (refused before decoding)."""


class DeviceError(DeeplabError):
    """The requested execution device (e.g. CUDA) is not usable."""

    exit_code = 2


class OutputError(DeeplabError):
    """An output cannot be written, or would land on an input; the message names the output path."""


class StdoutClosed(DeeplabError):
    """The reader of our stdout went away (``deeplab segment --json | head -1``): stop quietly.

    Not an ``OSError`` on purpose: click swallows ``EPIPE`` itself (exit 1), before ``cli.main`` sees it.
    """

    exit_code = 141
