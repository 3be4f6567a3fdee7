"""frcnn predict: boxes back in original pixels, bad images named, JSON and --draw outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline import inference as P
from pipeline.cli import main
from pipeline.images import resize_image, scale_boxes


class FixedDetector(nn.Module):
    """Returns the same S-frame detections for every image; records what it was fed."""

    def __init__(self, size: int, boxes, scores, labels):
        super().__init__()
        self.image_size = size
        self.out = {"boxes": torch.tensor(boxes, dtype=torch.float32),
                    "scores": torch.tensor(scores), "labels": torch.tensor(labels)}
        self.inputs = []

    def forward(self, images):
        self.inputs.append(images)
        return [dict(self.out) for _ in range(images.shape[0])]


def _image(path: Path, w: int, h: int, colour=(200, 30, 30)) -> Path:
    Image.new("RGB", (w, h), colour).save(path)
    return path


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
def test_boxes_map_back_to_the_original_frame(tmp_path, mode):
    path = _image(tmp_path / "a.png", 200, 100)
    original = np.array([[100.0, 50.0, 180.0, 90.0], [10.0, 20.0, 50.0, 60.0]])
    loaded, = P.load_images([str(path)], 64, mode)
    in_frame = scale_boxes(original, loaded.info)                 # where prepare puts them
    model = FixedDetector(64, in_frame.tolist(), [0.3, 0.9], [2, 1])
    result, = P.predict(model, [loaded], class_names=["cat", "dog"], batch_size=4,
                        device=torch.device("cpu"))
    assert (result["width"], result["height"]) == (200, 100)
    assert result["scores"] == [0.9, 0.3]                         # best first
    assert result["labels"] == [1, 2] and result["classes"] == ["cat", "dog"]
    np.testing.assert_allclose(result["boxes"], original[::-1], atol=0.01)
    fed = model.inputs[0]
    assert fed.shape == (1, 3, 64, 64) and 0.0 <= float(fed.min()) and float(fed.max()) <= 1.0
    expected, _ = resize_image(Image.open(path).convert("RGB"), 64, mode)   # prepare's resize
    np.testing.assert_allclose(fed[0].permute(1, 2, 0).numpy() * 255, np.asarray(expected),
                               atol=1e-3)


def test_batches_and_class_ids_without_names(tmp_path):
    paths = [str(_image(tmp_path / f"{i}.png", 30 + i, 40)) for i in range(5)]
    loaded = [x for x in P.load_images(paths, 32, "stretch")]
    model = FixedDetector(32, [[0, 0, 16, 16]], [0.5], [3])
    results = P.predict(model, loaded, class_names=[], batch_size=2, device=torch.device("cpu"))
    assert [r["image"] for r in results] == paths
    assert [x.shape[0] for x in model.inputs] == [2, 2, 1]
    assert results[0]["classes"] == ["3"]


def test_unreadable_images_are_reported_by_name(tmp_path):
    good = str(_image(tmp_path / "good.png", 20, 20))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "good.png").read_bytes()[:40])
    out = list(P.load_images([str(tmp_path / "missing.jpg"), str(broken), good,
                              str(truncated)], 32, "stretch"))
    assert out[0] == (str(tmp_path / "missing.jpg"), "not found")
    assert out[1][0] == str(broken) and "unreadable" in out[1][1]
    assert isinstance(out[2], P.Loaded)
    assert out[3][0] == str(truncated) and "unreadable" in out[3][1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    from detector.serialization import save_model
    from detector import FasterRCNN, RoIHeadSettings

    torch.manual_seed(0)
    model = FasterRCNN(2, image_size=64, roi_head=RoIHeadSettings(hidden_dim=32))
    return save_model(tmp_path_factory.mktemp("m") / "frcnn.pt", model, classes=["cat", "dog"])


def test_cli_prints_json_and_names_bad_images(tmp_path, model_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                   # no params.yaml: defaults
    good = _image(tmp_path / "good.png", 120, 80)
    code = main(["predict", str(good), str(tmp_path / "missing.png"), "--model", str(model_file)])
    captured = capsys.readouterr()
    assert code == 1
    assert f"{tmp_path / 'missing.png'}: not found" in captured.err
    result, = json.loads(captured.out)
    assert result["image"] == str(good) and (result["width"], result["height"]) == (120, 80)
    assert {"boxes", "scores", "labels", "classes"} <= set(result)
    boxes = np.asarray(result["boxes"]).reshape(-1, 4)
    assert (boxes[:, [0, 2]] <= 120).all() and (boxes[:, [1, 3]] <= 80).all() and (boxes >= 0).all()
    assert set(result["classes"]) <= {"cat", "dog"}


def test_cli_draw_writes_images_at_original_size(tmp_path, model_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other").mkdir()
    a = _image(tmp_path / "a.png", 90, 70)
    b = _image(tmp_path / "other" / "a.png", 50, 40)
    code = main(["predict", str(a), str(b), "--model", str(model_file), "--draw", "out"])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == ["out/a.png", "out/a_2.png"]
    with Image.open(tmp_path / "out" / "a_2.png") as img:
        assert img.size == (50, 40)


def test_cli_missing_model_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = _image(tmp_path / "good.png", 20, 20)
    assert main(["predict", str(good), "--model", "nope/frcnn.pt"]) == 1
    assert "nope/frcnn.pt: model not found" in capsys.readouterr().err


def test_cli_resizes_as_the_model_file_records_not_as_the_config_says(tmp_path, monkeypatch,
                                                                       capsys):
    """A letterbox-trained model predicts with letterbox under ``data.resize: stretch`` (the
    model file records how its training images were resized); a file without the record falls
    back to ``data.resize`` and says so."""
    from detector import FasterRCNN, RoIHeadSettings
    from detector.serialization import save_model
    from pipeline import inference

    torch.manual_seed(0)
    model = FasterRCNN(2, image_size=64, roi_head=RoIHeadSettings(hidden_dim=32))
    boxed = save_model(tmp_path / "letterbox.pt", model, classes=["cat", "dog"],
                       resize="letterbox")
    bare = save_model(tmp_path / "old.pt", model, classes=["cat", "dog"])
    used = []
    real = inference.predict_sources
    monkeypatch.setattr("pipeline.predict.predict_sources",
                        lambda *a, **kw: used.append(kw["resize"]) or real(*a, **kw))
    monkeypatch.chdir(tmp_path)
    good = _image(tmp_path / "good.png", 120, 80)
    assert main(["predict", str(good), "--model", str(boxed), "--set", "data.resize=stretch"]) == 0
    assert main(["predict", str(good), "--model", str(bare), "--set", "data.resize=stretch"]) == 0
    assert used == ["letterbox", "stretch"]
    assert "does not record how its training images were resized; using data.resize=stretch" \
        in capsys.readouterr().err
