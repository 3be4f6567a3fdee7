"""The detector as an MLflow model: logged from code and registered, served by ``mlflow models
serve`` on 127.0.0.1, read back by ``frcnn predict --model models:/...``.

A small detector (random weights at 64 x 64, 2 classes) is logged into a SQLite store by
:func:`pipeline.tracking.models.log_detector` (what each training stage does), then:

- the store has the registered model ``frcnn`` version 1 with a signature (an ``image``
  column of base64 text) and an input example, its files hold the model code and the ``.pt``
  weights, and no pickle;
- ``mlflow models serve -m models:/frcnn/1 --env-manager local`` (a real server, started and
  stopped by the test) answers a POST to ``/invocations`` of images of different sizes and
  formats with ``{"predictions": [...]}``: for each image the same fields and values as
  ``frcnn predict``'s JSON for the same files, in original pixels; a row that is not an image
  gets an error for that row, and the server keeps answering;
- ``frcnn predict --model models:/frcnn/latest`` and ``runs:/<run id>/detector`` give the same JSON
  as the local file.
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.config import Config
from pipeline import tracking
from tests.support import BIN, mlflow_store
from tests.support.detections import same_detections
from tests.support.procs import free_ports, kill_session, subprocess_env
from tests.support.servers import wait_for

pytestmark = pytest.mark.slow  # a real model server, and MLflow models logged for real


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """``(folder, store URI, model file, run id)`` of a detector logged and registered."""
    from detector import AnchorSettings, FasterRCNN, RoIHeadSettings
    from detector.serialization import save_model
    from pipeline.tracking.models import log_detector, thumbnail

    folder = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    # explicit anchor shapes (anchors.shapes): the served model rebuilds them from its file
    model = FasterRCNN(2, image_size=64, roi_head=RoIHeadSettings(hidden_dim=32),
                       anchors=AnchorSettings(shapes=((16.0, 16.0), (40.0, 24.0), (24.0, 40.0),
                                                      (48.0, 48.0))))
    # class scores spread apart (untrained, every class scores ~1/3: near-ties everywhere)
    torch.nn.init.normal_(model.roi_heads.cls_score.weight, std=1.0)
    weights = save_model(folder / "frcnn.pt", model, stage="frcnn", classes=["cat", "dog"])
    store = f"sqlite:///{folder / 'mlflow.db'}"
    cfg = Config().replace({"tracking.uri": store, "eval.batch_size": 2})
    example = _image(folder / "example.png", 40, 30).read_bytes()
    with tracking.stage_run(cfg, "train_frcnn") as run:
        uri = log_detector(run, weights, cfg=cfg, stage="frcnn", example_image=thumbnail(example))
    assert uri == "models:/frcnn/1"
    (params := folder / "params.yaml").write_text(f"tracking:\n  uri: {store}\n")
    return folder, store, weights, run.run_id, params


def _image(path: Path, width: int, height: int) -> Path:
    gen = torch.Generator().manual_seed(width * 1000 + height)
    pixels = (torch.rand(height, width, 3, generator=gen) * 255).byte().numpy()
    Image.fromarray(pixels).save(path)
    return path


def _predict_json(capsys, *args: str) -> list[dict]:
    assert main(["predict", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_model_is_registered_with_a_signature_an_example_and_no_pickle(logged):
    folder, store, _, run_id, _ = logged
    client = mlflow_store.client(store)
    (version,) = client.search_model_versions("name = 'frcnn'")
    assert str(version.version) == "1" and version.run_id == run_id
    model = Path(client.download_artifacts(run_id, "", str(folder / "download")))
    files = {p.name for p in Path(folder / "mlartifacts").rglob("*") if p.is_file()}
    assert {"MLmodel", "frcnn.pt", "served_model.py", "input_example.json"} <= files
    assert not [p for p in folder.joinpath("mlartifacts").rglob("*.pkl")]
    mlmodel = next(folder.joinpath("mlartifacts").rglob("MLmodel")).read_text()
    assert "image" in mlmodel and "string" in mlmodel          # the signature's input column
    assert model.is_dir()


def test_served_model_answers_like_frcnn_predict(logged, tmp_path, monkeypatch, capsys):
    folder, store, weights, _, _ = logged
    files = [_image(tmp_path / "a.png", 120, 80), _image(tmp_path / "b.jpg", 50, 64),
             _image(tmp_path / "c.png", 64, 64)]
    monkeypatch.chdir(tmp_path)
    expected = _predict_json(capsys, *map(str, files), "--model", str(weights))
    (port,) = free_ports(1)
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/frcnn/1", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port)],
        env=subprocess_env(MLFLOW_TRACKING_URI=store), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, 180, tmp_path / "serve.log")
        rows = [[base64.b64encode(f.read_bytes()).decode()] for f in files]
        rows.insert(1, [base64.b64encode(b"not an image").decode()])
        answer = _post(port, {"dataframe_split": {"columns": ["image"], "data": rows}})
        again = _post(port, {"dataframe_split": {"columns": ["image"], "data": rows[:1]}})
    finally:
        kill_session(server, grace=5.0)
        log.close()
    predictions = answer["predictions"]
    assert len(predictions) == 4
    assert predictions[1] == {"image": 1, "error": "unreadable image (UnidentifiedImageError)"}
    # another process, other batches: the same detections to the printed precision, in any
    # order of near-tied scores
    for got, want in zip([predictions[0], *predictions[2:]], expected):
        assert (got["width"], got["height"]) == (want["width"], want["height"])
        assert got["boxes"] and same_detections(got, want, box_tol=0.02, score_tol=2e-4), (got, want)
        assert sorted(zip(got["labels"], got["classes"])) == sorted(zip(want["labels"], want["classes"]))
    assert (predictions[0]["width"], predictions[0]["height"]) == (120, 80)
    assert same_detections(again["predictions"][0], predictions[0], box_tol=0.02, score_tol=2e-4)


def test_frcnn_predict_reads_registered_and_run_models(logged, tmp_path, monkeypatch, capsys):
    _, _, weights, run_id, params = logged
    image = str(_image(tmp_path / "x.png", 70, 50))
    monkeypatch.chdir(tmp_path)
    local = _predict_json(capsys, image, "--model", str(weights))
    for uri in ("models:/frcnn/latest", f"runs:/{run_id}/detector"):
        assert _predict_json(capsys, image, "--model", uri, "--params", str(params)) == local
    assert main(["predict", image, "--model", "models:/nope/1", "--params", str(params)]) == 1
    assert "models:/nope/1: no such model in sqlite:///" in capsys.readouterr().err


def _post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())
