"""The CV-fold ensemble as users get it back (registry.model=ensemble): an MLflow pyfunc with
the single model's contract (equip.serve.pyfunc): a DataFrame with an `image` column in;
`class`, `probability` and one `p_<class>` column per class out, the mean of the k fold models'
probabilities. Saved among a run's artifacts (the CV sweep's parent), like every equip model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from equip.serve.pyfunc import ImageClassifierModel, _requirements, log_run_model, model_signature

MEMBER = "fold_"  # artifact names of the members: fold_0, fold_1, ...
ENSEMBLE_MODEL_CODE = Path(__file__).with_name("_ensemble_model.py")


class EnsembleClassifierModel(ImageClassifierModel):
    """The single model's pyfunc, its one model being the folds' FoldEnsemble."""

    def load_context(self, context) -> None:
        from equip.model.cnn import load_classifier
        from equip.model.ensemble import FoldEnsemble
        from equip.serve.request_limit import serve_with_request_limit
        from equip.serve.runtimes import make_runner

        serve_with_request_limit()  # mlflow models serve: an oversized body is never read
        config = context.model_config or {}
        names = sorted(
            (k for k in context.artifacts if k.startswith(MEMBER)),
            key=lambda k: int(k.removeprefix(MEMBER)),
        )
        self.model = FoldEnsemble([load_classifier(context.artifacts[k]) for k in names])
        self.runner = make_runner(self.model, None, config.get("runtime"))  # torch: no graph
        self.image_root = config.get("image_root") or None


def log_ensemble_pyfunc(
    run_id: str, checkpoints: Sequence[str], classes: list[str], image_size: int, **about
) -> str:
    """Save the fold checkpoints (in fold order) as run `run_id`'s `model`; its model URI.
    `about` goes into the model's metadata (e.g. the fold runs)."""
    return log_run_model(
        ENSEMBLE_MODEL_CODE,
        run_id=run_id,
        artifacts={f"{MEMBER}{i}": path for i, path in enumerate(checkpoints)},
        signature=model_signature(classes),
        pip_requirements=_requirements(),
        metadata={"classes": classes, "image_size": image_size, "ensemble": True, **about},
        model_config={"image_root": "", "runtime": "auto"},  # declared: a load can set them
    )
