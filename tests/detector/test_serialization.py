"""Checkpoints: round trip, atomic writes, and clear errors for files that are not checkpoints."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from detector import (AnchorSettings, BackboneSettings, FasterRCNN, ProposalSettings,
                      RoIHeadSettings, load_model, save_model)

SMALL = dict(image_size=64, anchors=AnchorSettings(scales=(1.0, 2.0, 4.0)),
             proposals=ProposalSettings(min_size=4.0))


@pytest.fixture(scope="module")
def model() -> FasterRCNN:
    torch.manual_seed(0)
    return FasterRCNN(2, rpn_only=True, roi_head=RoIHeadSettings(pool="pool", hidden_dim=16),
                      **SMALL)


def test_round_trip(model: FasterRCNN, tmp_path: Path) -> None:
    path = save_model(tmp_path / "sub" / "rpn.pt", model, step=12, metrics={"AR@300": 0.5}, stage="rpn")
    assert path == tmp_path / "sub" / "rpn.pt"
    assert [p.name for p in path.parent.iterdir()] == ["rpn.pt"]  # no temp file left behind
    loaded, meta = load_model(path)
    assert meta == {"step": 12, "metrics": {"AR@300": 0.5}, "stage": "rpn"}
    assert loaded.config == model.config and loaded.rpn_only and loaded.roi_heads.pool == "pool"
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    images = torch.rand(1, 3, 64, 64)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.propose(images)[0][0], loaded.propose(images)[0][0])


def test_overwrites_and_unwraps(model: FasterRCNN, tmp_path: Path) -> None:
    class Wrapper(torch.nn.Module):  # like DistributedDataParallel: the model under .module
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.module = inner

    path = tmp_path / "m.pt"
    path.write_bytes(b"old")
    save_model(path, Wrapper(model))
    assert load_model(path)[0].config == model.config
    with pytest.raises(TypeError, match="FasterRCNN"):
        save_model(tmp_path / "x.pt", torch.nn.Linear(2, 2))


def test_metadata_must_be_plain(model: FasterRCNN, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"meta\['when'\]"):
        save_model(tmp_path / "m.pt", model, when=object())
    assert not any(tmp_path.iterdir())


def test_imagenet_config_loads_without_download(model: FasterRCNN, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("no network")))
    path = tmp_path / "m.pt"
    config = model.config | {"backbone": {**model.config["backbone"], "weights": "imagenet"}}
    torch.save({"state_dict": model.state_dict(), "config": config, "meta": {}}, path)
    loaded, _ = load_model(path)
    assert loaded.config["backbone"]["weights"] == "imagenet"
    assert torch.equal(loaded.backbone.features[0].weight, model.backbone.features[0].weight)
    # Frozen as the constructor froze them from pretrained weights: conv1, conv2 (features[:10]).
    frozen = {n for n, p in loaded.named_parameters() if not p.requires_grad}
    assert frozen == {f"backbone.features.{i}.{w}" for i in (0, 2, 5, 7) for w in ("weight", "bias")}
    assert all(p.requires_grad for p in load_model(save_model(tmp_path / "none.pt", model))[0].parameters())


def test_new_settings_round_trip_and_old_checkpoints_get_their_defaults(tmp_path: Path) -> None:
    """Settings round-trip; a file saved before a setting existed gets its default; a file of
    the former flat keywords loads into the same model."""
    torch.manual_seed(0)
    model = FasterRCNN(2, roi_head=RoIHeadSettings(hidden_dim=16, dropout=0.1),
                       backbone=BackboneSettings(freeze_blocks=3), **SMALL)
    loaded, _ = load_model(save_model(tmp_path / "new.pt", model))
    assert loaded.config["roi_head"]["dropout"] == 0.1 and loaded.roi_heads.dropout == 0.1
    assert loaded.config["backbone"]["freeze_blocks"] == 3
    old_config = {**model.config, "roi_head": {"hidden_dim": 16},   # saved before they existed
                  "backbone": {"weights": "none"}}
    torch.save({"state_dict": model.state_dict(), "config": old_config, "meta": {}}, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    assert old.config["roi_head"]["dropout"] == 0.5 and old.config["backbone"]["freeze_blocks"] == 2
    assert old.roi_heads.dropout == 0.5
    flat = {"num_classes": 2, "image_size": 64, "anchor_scales": (1.0, 2.0, 4.0),
            "rpn_min_size": 4.0, "roi_hidden_dim": 16, "roi_dropout": 0.1,
            "backbone_freeze_blocks": 3, "backbone_weights": "none"}
    torch.save({"state_dict": model.state_dict(), "config": flat, "meta": {}}, tmp_path / "flat.pt")
    assert load_model(tmp_path / "flat.pt")[0].config == model.config


def test_bad_files_raise_value_errors_naming_path_and_problem(model: FasterRCNN, tmp_path: Path) -> None:
    good = save_model(tmp_path / "good.pt", model)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint")
    not_ours = tmp_path / "not_ours.pt"
    torch.save({"weights": torch.zeros(2)}, not_ours)
    a_list = tmp_path / "a_list.pt"
    torch.save([1, 2, 3], a_list)
    mismatch = tmp_path / "mismatch.pt"
    torch.save({"state_dict": model.state_dict(), "config": model.config | {"roi_hidden_dim": 8}, "meta": {}},
               mismatch)
    unknown = tmp_path / "unknown.pt"
    torch.save({"state_dict": {}, "config": model.config | {"colour": "blue"}, "meta": {}}, unknown)
    for path, problem in [(truncated, "truncated or corrupt"), (garbage, "truncated or corrupt"),
                          (not_ours, "not a detector checkpoint"), (a_list, "not a detector checkpoint"),
                          (mismatch, "do not fit"), (unknown, "cannot rebuild")]:
        with pytest.raises(ValueError, match=problem) as info:
            load_model(path)
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
