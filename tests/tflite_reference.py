"""Test support: the original TFLite files run by the reference runtime (ai-edge-litert).

``TFLiteReference`` pads an image bottom/right with the model's mean to the file's fixed input size,
runs the interpreter and returns the logits tensor inside the graph (before the graph's own final
upsampling) together with the graph's output (upsampled logits, or labels for the uint8 model).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from deeplab_cli.importers.tflite import TFLiteGraph
from deeplab_cli.zoo import ModelSpec


class TFLiteReference:
    """One interpreter for one released file, keeping intermediate tensors."""

    def __init__(self, path: Path, spec: ModelSpec, num_threads: int = 2) -> None:
        from ai_edge_litert.interpreter import Interpreter

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.interpreter = Interpreter(
                model_path=str(path), num_threads=num_threads, experimental_preserve_all_tensors=True
            )
        self.interpreter.allocate_tensors()
        self.spec = spec
        detail = self.interpreter.get_input_details()[0]
        self.input_index = detail["index"]
        self.input_dtype = detail["dtype"]
        self.size = int(detail["shape"][1]), int(detail["shape"][2])
        self.output_index = self.interpreter.get_output_details()[0]["index"]
        self.logits_index = self._find_logits(TFLiteGraph(Path(path).read_bytes(), Path(path).name))

    @staticmethod
    def _find_logits(graph: TFLiteGraph) -> int:
        """Walk back from the output through ARG_MAX and RESIZE_BILINEAR ops to the last conv output."""
        tensor = graph.outputs[0]
        while tensor in graph.producer and graph.ops[graph.producer[tensor]][0] in (
            "RESIZE_BILINEAR",
            "ARG_MAX",
        ):
            tensor = graph.ops[graph.producer[tensor]][1][0]
        return tensor

    def padded(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> 1 x H0 x W0 x 3 float32 RGB 0..255 padded bottom/right with the mean."""
        height, width = self.size
        batch = np.empty((1, height, width, 3), np.float32)
        batch[:] = np.asarray(self.spec.mean, np.float32)
        batch[0, : image.shape[0], : image.shape[1]] = image
        return batch

    def run(self, padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (C x h x w, float32) and the graph output (C x H x W logits, or H x W labels)."""
        if self.input_dtype == np.uint8:
            feed = np.round(padded).astype(np.uint8)
        else:
            mean = np.asarray(self.spec.mean, np.float32)
            std = np.asarray(self.spec.std, np.float32)
            feed = ((padded - mean) / std).astype(np.float32)
        self.interpreter.set_tensor(self.input_index, feed)
        self.interpreter.invoke()
        logits = self.interpreter.get_tensor(self.logits_index)[0].transpose(2, 0, 1).astype(np.float32)
        output = self.interpreter.get_tensor(self.output_index)[0]
        output = output.transpose(2, 0, 1) if output.ndim == 3 else output
        return logits, output


def load_rgb(path: Path, fit: tuple[int, int] | None = None) -> np.ndarray:
    """An image as HxWx3 uint8 RGB, scaled down (keeping aspect) to fit ``fit`` if it is larger."""
    image = Image.open(path).convert("RGB")
    if fit and (image.height > fit[0] or image.width > fit[1]):
        scale = min(fit[0] / image.height, fit[1] / image.width)
        image = image.resize(
            (max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.BILINEAR
        )
    return np.asarray(image)
