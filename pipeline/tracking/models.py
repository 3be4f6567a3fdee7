"""The detector as an MLflow model: logged with each training stage, registered, read back.

:func:`log_detector` logs a trained model file with MLflow's models-from-code
(:mod:`pipeline.tracking.served_model`: source code and the ``.pt`` weights, nothing pickled), a
signature and an input example, into the stage's run, and registers it under
``tracking.rpn_model_name`` / ``tracking.frcnn_model_name`` when ``tracking.register_models``
and the store has a model registry. :func:`model_weights` downloads the weights of a logged
model (``models:/frcnn/latest``, ``models:/frcnn/3``, ``runs:/<run id>/detector``) for
``frcnn predict``.
"""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import MissingInputError
from pipeline.tracking.runs import RUNNING, RunHandle
from pipeline.tracking.store import _client, global_uri, resolve_uri

PACKAGE = Path(__file__).resolve().parents[2]          # the folder holding pipeline/, detector/
MODEL_CODE = Path(__file__).with_name("served_model.py")
ARTIFACT = "detector"            # runs:/<run id>/detector (the run's own model/ holds the .pt file)
#: What serving the model needs, at the versions installed here (pyproject.toml owns the pins)
SERVED_PACKAGES = ("torch", "torchvision", "pandas", "pillow", "numpy", "pyyaml", "pyarrow")


def requirements() -> list[str]:
    """``["torch==<installed>", ...]`` of :data:`SERVED_PACKAGES`, read from the installed
    packages' metadata."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in SERVED_PACKAGES]


def example_input(image: bytes) -> Any:
    """The model's input for one image file's bytes: ``DataFrame({"image": [base64 text]})``."""
    import pandas as pd

    return pd.DataFrame({"image": [base64.b64encode(image).decode("ascii")]})


def _has_registry(run: RunHandle) -> bool:
    try:
        run.client.search_registered_models(max_results=1)
    except Exception:  # a file store, or a server without one
        return False
    return True


def log_detector(run: RunHandle, weights: Path, *, cfg: Config, stage: str,
                 example_image: bytes) -> str:
    """Log ``weights`` (a model file of ``stage``) as the MLflow model ``model`` of ``run``;
    returns its ``models:/`` URI (registered) or ``runs:/`` URI."""
    import mlflow
    from mlflow.models import infer_signature

    from pipeline.tracking.served_model import Detector

    config = {"stage": stage, "resize": cfg.data.resize, "batch_size": cfg.eval.batch_size,
              "output": "proposals" if stage == "rpn" else "detections"}
    example = example_input(example_image)
    served = Detector()
    served.load_context(_Context({"weights": str(weights)}, config))
    with warnings.catch_warnings():  # "integer columns cannot hold missing values": none here
        warnings.simplefilter("ignore", UserWarning)
        signature = infer_signature(example, served.predict(None, example))
    name = cfg.tracking.rpn_model_name if stage == "rpn" else cfg.tracking.frcnn_model_name
    registered = name if cfg.tracking.register_models and _has_registry(run) else None
    with global_uri(run.tracking_uri), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer", UserWarning)
        mlflow.start_run(run_id=run.run_id)          # log_model needs MLflow's active run
        try:
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT, python_model=str(MODEL_CODE), artifacts={"weights": str(weights)},
                model_config=config, signature=signature, input_example=example,
                code_paths=[str(PACKAGE / "pipeline"), str(PACKAGE / "detector")],
                pip_requirements=requirements(), registered_model_name=registered)
        finally:
            mlflow.end_run(status=RUNNING)           # the stage ends its run itself
    if registered:
        version = info.registered_model_version
        return f"models:/{registered}/{version}"
    return f"runs:/{run.run_id}/{ARTIFACT}"


class _Context:
    """What :meth:`Detector.load_context` reads of MLflow's context."""

    def __init__(self, artifacts: dict[str, str], model_config: dict[str, Any]) -> None:
        self.artifacts, self.model_config = artifacts, model_config


def model_weights(cfg: Config, uri: str, folder: Path) -> Path:
    """Download the MLflow model ``uri`` of the store ``tracking.uri`` into ``folder``; the path
    of its weights file.

    Raises:
        MissingInputError: no such model, version or run in the store.
    """
    import mlflow
    import yaml

    store = resolve_uri(cfg.tracking.uri)
    _client(store)  # quiet store set-up
    try:
        # a models:/ URI is resolved in the model registry, which is the tracking store unless
        # $MLFLOW_REGISTRY_URI says otherwise: MLflow reads it from its process-wide URI
        with global_uri(store):
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(folder), tracking_uri=store))
    except Exception as exc:  # MlflowException of every kind: not there
        raise MissingInputError(f"{uri}: no such model in {store} ({str(exc)[:300]})") from None
    meta = yaml.safe_load((local / "MLmodel").read_text())
    path = meta["flavors"]["python_function"]["artifacts"]["weights"]["path"]
    return local / path


def thumbnail(data: bytes) -> bytes:
    """A small PNG of an image file's bytes (the input example: 64 px on a side at most)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((64, 64))
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()
