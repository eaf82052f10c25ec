"""The CNN as one ONNX graph, from uint8 pixels to class probabilities.

The graph covers everything between the decoded image and the answer: the network's own
normalisation (uint8 -> [-1, 1], its first layer), the convolutions, softmax, and the
test-time augmentation (model.tta: the mirror and the scales go through the network as one
batch and their probabilities are averaged, as Classifier.forward does). A runtime makes one
call per batch of preprocessed images.

Exported with torch's dynamo exporter (torch.export + onnxscript): the TorchScript exporter
(dynamo=False) is deprecated since torch 2.9 and warns on every export. Its cost is the first
export in a process (~3-5 s, mostly importing onnxscript and torch._dynamo); a training logs
one model.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from equip.runtime import cpu_count

if TYPE_CHECKING:
    import onnxruntime

    from equip.model.cnn import Classifier

OPSET = 18  # onnxruntime 1.17+ runs it; the dynamo exporter's own default
INPUT, OUTPUT = "image", "probabilities"
MAX_PARITY_ERROR = 1e-4  # max |Δprob| between the ONNX graph and torch


class ProbabilityNet(nn.Module):
    """(N, 3, S, S) uint8 images -> (N, classes) probabilities: the model's own eval forward
    (a Classifier with its test-time augmentation, or a FoldEnsemble of them) and softmax."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.model = classifier.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).softmax(1)


def input_spec(image_size: int) -> dict[str, Any]:
    """What the graph takes, as recorded with the model (`batch` is a dynamic axis)."""
    return {"name": INPUT, "dtype": "uint8", "shape": ["batch", 3, image_size, image_size]}


def export_onnx(classifier: Classifier, path: Path) -> dict[str, Any]:
    """Write `classifier` as an ONNX graph to `path` (weights inside, one file); returns its
    spec: opset, input and output, exporter, export time, and the largest probability gap to
    torch on a random batch (the export is refused above MAX_PARITY_ERROR)."""
    net = ProbabilityNet(classifier.eval()).eval()
    size = classifier.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)  # 2: a batch of 1 specialises
    for name in ("onnxscript", "onnx_ir"):  # its optimiser's INFO notes, a line per pass
        if logging.getLogger(name).level == logging.NOTSET:  # a level someone set wins
            logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # exporter notes on its own internals: nothing to act on
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    export_s = time.perf_counter() - t0
    gap = parity_gap(net, path, size)
    if not gap <= MAX_PARITY_ERROR:
        path.unlink()
        raise ValueError(f"the ONNX graph differs from torch by {gap:.2g} in probability")
    return {
        "file": path.name,
        "opset": OPSET,
        "input": input_spec(size),
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", len(classifier.classes)]},
        "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
        "export_s": round(export_s, 3),
        "parity_max_abs_diff": float(gap),
    }


def parity_gap(net: ProbabilityNet, path: Path, image_size: int, n: int = 3) -> float:
    """max |Δprob| between the ONNX graph and torch on `n` random images."""
    images = torch.randint(
        0,
        256,
        (n, 3, image_size, image_size),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.inference_mode():
        expected = net(images).numpy()
    got = onnx_session(str(path)).run(None, {INPUT: images.numpy()})[0]
    return float(np.abs(got - expected).max())


def onnx_session(path: str) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the CPU with one thread per core this process may use (its
    default counts the machine's cores, not the process's affinity) and no inter-op pool (the
    graph is a chain). Threads sleep between runs when OpenMP's do (equip sets
    OMP_WAIT_POLICY=PASSIVE): spinning takes the cores from anything else running."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_count()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: its notes are not the user's business
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
