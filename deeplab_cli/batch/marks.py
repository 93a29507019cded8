"""How a run recognises its own outputs, so that ``segment DIR -o DIR`` never feeds them back as inputs.

Two marks, both written by every run:
- the output folder holds a small file :data:`MARKER` (``.deeplab-output``): JSON lines, a header and
  then one record per input whose outputs were written (what ``--skip-existing`` reports for them later);
- every label mask PNG carries a ``Software: deeplab-cli`` text chunk (:data:`MASK_TAG`), placed before
  the image data, so the first few kilobytes of a PNG tell whether we wrote it.

Inside a folder tree holding the marker, a file is ours when its name ends with one of our compound
suffixes (``.overlay.jpg``, ``.logits.npy``, ``.probs.npz``) or it is a PNG with the tag. Outside a
marked tree nothing is presumed ours: a user's ``x.overlay.jpg`` elsewhere is an input like any other.
"""

from __future__ import annotations

import os

from deeplab_cli.files import MASK_TAG

MARKER = ".deeplab-output"
OUTPUT_SUFFIXES = {"mask": ".png", "overlay": ".overlay.jpg", "logits": ".logits.npy", "probs": ".probs.npz"}
_TAG_BYTES = b"tEXt" + MASK_TAG[0].encode() + b"\x00" + MASK_TAG[1].encode()
_HEAD_BYTES = 4096  # signature, IHDR, PLTE (768 bytes), tRNS, then our text chunk


def is_marked(folder: str) -> bool:
    """Whether ``folder`` is the output folder of a run (holds the marker file)."""
    return os.path.isfile(os.path.join(folder, MARKER))


def has_mask_tag(path: str) -> bool:
    """Whether ``path`` is a PNG label mask written by deeplab (the text chunk near its start)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and _TAG_BYTES in head


def is_own_output(path: str) -> bool:
    """Whether a file found under a marked folder is one of our outputs (see the module docstring)."""
    name = os.path.basename(path).lower()
    compound = [suffix for kind, suffix in OUTPUT_SUFFIXES.items() if kind != "mask"]
    if any(name.endswith(suffix) for suffix in compound):
        return True
    return name.endswith(".png") and has_mask_tag(path)
