"""Trimap curves as in DeepLab v1 Fig. 4: pixel accuracy and mIoU inside bands around object boundaries."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def trimap_figure_png(result: dict[str, Any], dpi: int = 100) -> bytes:
    """The PNG bytes of the two trimap panels (accuracy, mIoU vs band width) for an eval JSON document."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=dpi)
    panels = figure.subplots(1, 2)
    variants = [("no CRF", result["no_crf"], "tab:blue", "o")]
    if result.get("crf"):
        variants.append(("CRF", result["crf"], "tab:red", "s"))
    for axis, key, title in (
        (panels[0], "pixel_accuracy", "Pixel accuracy in band (%)"),
        (panels[1], "miou", "Mean IoU in band (%)"),
    ):
        for label, scores, colour, marker in variants:
            trimap = scores["trimap"]
            values = [100 * v if v is not None else float("nan") for v in trimap[key]]
            axis.plot(trimap["widths"], values, color=colour, marker=marker, markersize=3, label=label)
        axis.set_xlabel("Trimap width (pixels)")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend(loc="lower right")
    crf_note = " / with CRF" if result.get("crf") else ""
    figure.suptitle(
        f"{result['model']} on {result['dataset']} {result['split']} ({result['images']} images){crf_note}"
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_trimap_plot(path: Path, result: dict[str, Any]) -> Path:
    """Draw the trimap curves into ``path`` (PNG, written atomically)."""
    from deeplab_cli.files import write_bytes

    return write_bytes(path, trimap_figure_png(result))
