"""Inference speed of the logged CNN: its pyfunc on torch and on ONNX Runtime, against the raw
torch forward of the same network on the same preprocessed tensors, side by side in one run.

experiment=gear's CNN (conf/model/cnn_gear.yaml: mirror TTA on), untrained: timing does not
depend on the weights. It is logged as a training logs it (equip.serve.pyfunc.log_pyfunc, ONNX
export included) into a throw-away store, then loaded with runtime=torch and runtime=onnx.
Photos: the gear photos (../shared/data/gear_images, or --photos) when present, else the
built-in synthetic images encoded as 300 px JPEGs. Rounds alternate the cases, so that load on
the machine hits them alike.

    python bench/inference.py [--photos DIR | --synthetic] [--cores 2] [--batch 60]
                              [--single 40] [--rounds 5]

Single photo: p50/p95 (wall clock, and the process's CPU time, which load does not inflate) of
one base64 photo through pyfunc.predict (decode, preprocess, network, DataFrame out) against
the raw forward of its preprocessed tensor (Classifier.forward in eval: the image and its
mirror). Batch: photos/s for --batch photos in one request against the raw forward of the
--batch tensors in one call. The machine's load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The shared gear photos, beside the checkout (as tests/conftest.py finds them)
GEAR = Path(os.environ.get("EQUIP_GEAR_IMAGES") or ROOT.parent / "shared" / "data" / "gear_images")


def encoded_photos(folder: Path | None, n: int) -> tuple[list[bytes], str]:
    """`n` encoded photos (spread over the classes) and what they are."""
    if folder is not None and folder.is_dir():
        files = sorted(
            p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        )
        picked = files[:: max(1, len(files) // n)][:n]
        return [p.read_bytes() for p in picked], f"{len(picked)} photos from {folder}"
    from PIL import Image

    from equip.data.synthetic import make_synthetic

    images, _ = make_synthetic(-(-n // 12), 300, seed=1)
    out = []
    for im in images[:n]:
        buffer = io.BytesIO()
        Image.fromarray(im.transpose(1, 2, 0)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out, f"{len(out)} synthetic 300 px JPEGs"


def gear_checkpoint(folder: Path, image_size: int) -> str:
    """An untrained experiment=gear CNN as a Lightning checkpoint, as training writes one."""
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from equip.data.synthetic import CLASSES
    from equip.model.cnn import Classifier

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=gear", "data.root=unused"])
    module = Classifier(OmegaConf.to_container(cfg.model), list(CLASSES), image_size)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)  # no accelerator banner
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    path = str(folder / "gear.ckpt")
    trainer.save_checkpoint(path)
    return path


def log_and_load(checkpoint: str, folder: Path, image_size: int):
    """The checkpoint logged as a pyfunc (export timed), loaded once per runtime."""
    import mlflow

    from equip.data.synthetic import CLASSES
    from equip.serve.pyfunc import log_pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    mlflow.set_experiment("bench")
    with mlflow.start_run():
        t0 = time.perf_counter()
        uri = log_pyfunc(checkpoint, list(CLASSES), image_size)
        log_s = time.perf_counter() - t0
    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(folder / "model"))
    models = {
        rt: mlflow.pyfunc.load_model(local, model_config={"runtime": rt})
        for rt in ("torch", "onnx")
    }
    export_s = models["onnx"].metadata.metadata["onnx"]["export_s"]
    return models, log_s, export_s


def timed(cases: dict[str, Callable[[], object]], rounds: int, per_round: int) -> tuple:
    """Seconds per call of each case, the cases alternating within every round: wall clock,
    and the process's CPU time (all threads), which a loaded machine does not inflate."""
    for call in cases.values():  # warm-up: first-call allocations, lazy inits
        call()
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, call in cases.items():
            for _ in range(per_round):
                t0, c0 = time.perf_counter(), time.process_time()
                call()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return wall, cpu


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else max(values)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=GEAR, help="a photo folder (default: gear)")
    ap.add_argument("--synthetic", action="store_true", help="built-in images even with photos")
    ap.add_argument("--cores", type=int, default=2, help="cores the process may use")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--single", type=int, default=40, help="single-photo calls per round")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*weights_only.*")  # equip's own checkpoint
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: a.cores])

    import pandas as pd
    import torch

    from equip.serve.pyfunc import decode_images

    torch.set_num_threads(a.cores)
    photos, what = encoded_photos(None if a.synthetic else a.photos, a.batch)
    texts = [base64.b64encode(p).decode() for p in photos]
    with tempfile.TemporaryDirectory(prefix="equip-bench-") as tmp:
        checkpoint = gear_checkpoint(Path(tmp), a.image_size)
        models, log_s, export_s = log_and_load(checkpoint, Path(tmp), a.image_size)
    module = models["torch"].unwrap_python_model().model  # the Classifier, eval mode
    tensors = torch.from_numpy(decode_images(photos, a.image_size))
    one_frame = pd.DataFrame({"image": texts[:1]})
    batch_frame = pd.DataFrame({"image": texts})

    def raw(x: torch.Tensor) -> Callable[[], object]:
        def forward() -> object:
            with torch.inference_mode():
                return module(x)

        return forward

    single, single_cpu = timed(
        {
            "pyfunc, torch": lambda: models["torch"].predict(one_frame),
            "pyfunc, onnx": lambda: models["onnx"].predict(one_frame),
            "raw forward": raw(tensors[:1]),
            "decode+preprocess": lambda: decode_images(photos[:1], a.image_size),
        },
        a.rounds,
        a.single,
    )
    batch, _ = timed(
        {
            "pyfunc, torch": lambda: models["torch"].predict(batch_frame),
            "pyfunc, onnx": lambda: models["onnx"].predict(batch_frame),
            "raw forward": raw(tensors),
            "decode+preprocess": lambda: decode_images(photos, a.image_size),
        },
        a.rounds,
        1,
    )
    report(
        single,
        single_cpu,
        batch,
        a,
        what,
        f"model logged in {log_s:.1f} s (ONNX export {export_s:.1f} s)",
    )


def report(single: dict, cpu: dict, batch: dict, a, what: str, logged: str) -> None:
    raw_p50 = pct(single["raw forward"], 50)
    raw_rate = a.batch / statistics.median(batch["raw forward"])
    print(
        f"experiment=gear CNN (untrained), {a.image_size} px, mirror TTA; {what}; {a.cores} cores; "
        f"{a.rounds} rounds; {logged}; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'case':<20}{'1 photo p50':>14}{'p95':>12}{'x raw':>8}{'CPU p50':>11}{'x raw':>8}"
        f"{'photos/s':>10}{'x raw':>8}"
    )
    raw_cpu = pct(cpu["raw forward"], 50)
    for name in single:
        p50, p95 = pct(single[name], 50), pct(single[name], 95)
        rate = a.batch / statistics.median(batch[name])
        print(
            f"{name:<20}{p50 * 1e3:>11.2f} ms{p95 * 1e3:>9.2f} ms{p50 / raw_p50:>8.2f}"
            f"{pct(cpu[name], 50) * 1e3:>8.2f} ms{pct(cpu[name], 50) / raw_cpu:>8.2f}"
            f"{rate:>10.1f}{rate / raw_rate:>8.2f}"
        )
    print(
        "goal: pyfunc p50 <= 1.25 x raw forward (single photo), pyfunc batch >= 0.9 x raw "
        "(photos/s); decode+preprocess is part of the pyfunc, not of the raw forward"
    )


if __name__ == "__main__":
    main()
