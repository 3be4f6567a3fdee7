"""The detector as an MLflow model, from code: the file MLflow loads to serve a trained model.

Logged by :func:`pipeline.tracking.models.log_detector` with MLflow's models-from-code: this
file (no pickled Python objects), the model's ``.pt`` file as the artifact ``weights`` (read
with ``torch.load(weights_only=True)``), the project's ``pipeline`` and ``detector`` packages as
code, and a ``model_config`` with what prediction needs besides the weights (``resize``: how
``prepare`` resized the training images; ``batch_size``; ``output``: ``detections`` or, for
the RPN stage's model, ``proposals``).

Input: a DataFrame with one column ``image``: the bytes of an image file (PNG, JPEG, ...)
encoded as base64 text, one row per image, of any size. Output: one dict per row, in order,
with the fields of ``frcnn predict``'s JSON in the image's original pixels (``image``: the row
number, ``width``, ``height``, ``boxes``, ``scores``, ``labels``, ``classes``), or ``image``
and ``error`` for a row that is not a readable image (the other rows are still answered). The
same code as ``frcnn predict`` (:func:`pipeline.inference.predict_sources`) computes it.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class Detector(PythonModel):
    """A trained :class:`detector.FasterRCNN` behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        import torch

        from pipeline.modeling import load_model_file

        config = dict(context.model_config or {})
        self.batch_size = int(config.get("batch_size", 2))
        self.output = config.get("output", "detections")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, meta = load_model_file(context.artifacts["weights"],
                                           config.get("stage", "frcnn"), self.device)
        self.model.eval()
        self.classes = [str(c) for c in meta.get("classes", [])]
        # how the training images were resized: the model file's record first
        self.resize = meta.get("resize") or config.get("resize", "stretch")

    # no type hints: MLflow would read them as a signature (the logged one is inferred instead)
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        """``model_input``: DataFrame with a column ``image`` -> one dict per row."""
        from pipeline.inference import predict_proposals, predict_sources

        sources, answers = [], {}
        for i, value in enumerate(model_input["image"].tolist()):
            try:
                data = value if isinstance(value, bytes) else base64.b64decode(value,
                                                                               validate=True)
                sources.append((str(i), io.BytesIO(data)))
            except (binascii.Error, ValueError, TypeError) as exc:
                answers[i] = {"image": i, "error": f"not base64 image bytes ({exc})"}
        run = predict_proposals if self.output == "proposals" else predict_sources
        _, results, failed = run(self.model, sources, class_names=self.classes,
                                 resize=self.resize, batch_size=self.batch_size,
                                 device=self.device)
        answers.update({int(r["image"]): dict(r, image=int(r["image"])) for r in results})
        answers.update({int(name): {"image": int(name), "error": reason}
                        for name, reason in failed})
        return [answers[i] for i in range(len(model_input))]


mlflow.models.set_model(Detector())
