"""What runs the CNN behind the pyfunc: torch, or ONNX Runtime on the model's model.onnx.

`runtime=auto` (the default) is ONNX Runtime whenever the model has a model.onnx, else torch:
a fixed rule, not a race at load time, so the same model answers the same way on every load.
The rule is measured (bench/inference.py, experiment=gear's CNN on 2 cores): ONNX Runtime is
faster than torch both for one photo and for a batch. Models logged before equip exported
ONNX have no model.onnx and run on torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from equip.errors import EquipError

if TYPE_CHECKING:
    from equip.model.cnn import Classifier

RUNTIMES = ("auto", "onnx", "torch")


def check_runtime(value: object) -> str:
    """The runtime named by `runtime=`, or a one-line error that names the choices."""
    if value is None or value == "":
        return "auto"
    if value not in RUNTIMES:
        raise EquipError(f"runtime={value} is not known; use one of: {', '.join(RUNTIMES)}.")
    return str(value)


def pick_runtime(requested: object, has_onnx: bool) -> str:
    """`onnx` or `torch` for a model with (or without) a model.onnx."""
    runtime = check_runtime(requested)
    if runtime == "onnx" and not has_onnx:
        raise EquipError(
            "runtime=onnx: this model has no model.onnx (a .ckpt file, the baseline, or a CNN "
            "logged before equip exported ONNX); use runtime=torch or runtime=auto."
        )
    if runtime == "auto":
        return "onnx" if has_onnx else "torch"
    return runtime


class OnnxRunner:
    """(N, 3, S, S) uint8 -> (N, classes) probabilities through ONNX Runtime."""

    name = "onnx"

    def __init__(self, path: str, classes: Sequence[str], image_size: int) -> None:
        from equip.serve.onnx_export import onnx_session

        self.session = onnx_session(path)
        self.input = self.session.get_inputs()[0].name
        self.classes, self.image_size = list(classes), image_size

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(images)})[0]


class TorchRunner:
    """(N, 3, S, S) uint8 -> (N, classes) probabilities through torch, the same computation
    as the ONNX graph (equip.serve.onnx_export.ProbabilityNet)."""

    name = "torch"
    # Photos per network call: the activations of a few 128 px images stay in the CPU's caches;
    # 60 photos in one call took 1.9x the CPU time of 15 calls of 4 (gear CNN, one core). ONNX
    # Runtime's time does not depend on it.
    chunk = 4

    def __init__(self, classifier: Classifier) -> None:
        from equip.serve.onnx_export import ProbabilityNet

        self.net = ProbabilityNet(classifier.eval()).eval()
        self.classes, self.image_size = classifier.classes, classifier.image_size

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(images)
        with torch.inference_mode():
            parts = [self.net(x[i : i + self.chunk]) for i in range(0, len(x), self.chunk)]
        return torch.cat(parts).numpy() if parts else np.zeros((0, len(self.classes)), np.float32)


Runner = OnnxRunner | TorchRunner


def make_runner(classifier: Classifier, onnx_path: str | None, requested: object) -> Runner:
    """The runner `requested` (auto, onnx, torch) for a model with or without a model.onnx."""
    if pick_runtime(requested, onnx_path is not None) == "onnx":
        return OnnxRunner(str(onnx_path), classifier.classes, classifier.image_size)
    return TorchRunner(classifier)
