"""VGG-16 backbone: the exact layers, and the none / imagenet / path weights, without downloads."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import vgg16

from detector import AnchorSettings, BackboneSettings, FasterRCNN, RoIHeadSettings
from detector.backbone import VGG16Backbone, vgg16_features

SMALL = dict(image_size=64, anchors=AnchorSettings(scales=(1.0, 2.0, 4.0)),
             roi_head=RoIHeadSettings(hidden_dim=8))
VGG_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 file name in the hub cache


@pytest.fixture()
def no_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub cache and a network that refuses: any download attempt fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def refuse(url: str, *args, **kwargs):
        raise urllib.error.URLError(f"test: no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path


def fake_vgg_state(hidden: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A VGG-16 state dict with random values (classifier layers narrowed to ``hidden``)."""
    torch.manual_seed(seed)
    state = {f"features.{k}": torch.randn_like(v) for k, v in vgg16_features().state_dict().items()}
    state |= {"classifier.0.weight": torch.randn(hidden, 512 * 7 * 7),
              "classifier.0.bias": torch.randn(hidden),
              "classifier.3.weight": torch.randn(hidden, hidden), "classifier.3.bias": torch.randn(hidden),
              "classifier.6.weight": torch.randn(1000, hidden), "classifier.6.bias": torch.randn(1000)}
    return state


def test_features_are_vgg16_features_up_to_conv5_3() -> None:
    with torch.device("meta"):
        reference = vgg16().features[:30]
    ours = vgg16_features()
    assert [type(m) for m in ours] == [type(m) for m in reference]
    assert isinstance(ours[-1], nn.ReLU) and isinstance(ours[-2], nn.Conv2d)  # conv5_3 + ReLU
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    assert VGG16Backbone.out_channels == 512 and VGG16Backbone.stride == 16


def test_none_reads_and_downloads_nothing(no_download: Path) -> None:
    FasterRCNN(2, **SMALL)
    assert not any(no_download.rglob("*"))


def test_imagenet_without_cache_or_network_is_a_clear_error(no_download: Path) -> None:
    with pytest.raises(RuntimeError, match=r"imagenet.*(cache|checkpoints)") as info:
        FasterRCNN(2, backbone=BackboneSettings("imagenet"), **SMALL)
    assert str(no_download) in str(info.value)


def test_imagenet_from_the_torch_hub_cache(no_download: Path) -> None:
    state = fake_vgg_state()
    cache = no_download / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / VGG_FILE)
    model = FasterRCNN(2, backbone=BackboneSettings("imagenet"), **SMALL)
    torch.testing.assert_close(model.backbone.features[28].weight, state["features.28.weight"])
    torch.testing.assert_close(model.roi_heads.fc6.weight, state["classifier.0.weight"])
    torch.testing.assert_close(model.roi_heads.fc7.bias, state["classifier.3.bias"])


def test_local_state_dict_path(tmp_path: Path, no_download: Path) -> None:
    state = fake_vgg_state(seed=1)
    path = tmp_path / "vgg.pt"
    torch.save(state, path)
    model = FasterRCNN(2, backbone=BackboneSettings(str(path)), **SMALL)
    torch.testing.assert_close(model.backbone.features[0].weight, state["features.0.weight"])
    torch.testing.assert_close(model.roi_heads.fc6.weight, state["classifier.0.weight"])
    # fc layers of another width are left alone, with a warning
    with pytest.warns(UserWarning, match="classifier.0"), pytest.warns(UserWarning, match="classifier.3"):
        other = FasterRCNN(2, backbone=BackboneSettings(str(path)),
                           **(SMALL | {"roi_head": RoIHeadSettings(hidden_dim=16)}))
    torch.testing.assert_close(other.backbone.features[0].weight, state["features.0.weight"])


def test_bad_weight_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not 'none', 'imagenet' or an existing file"):
        FasterRCNN(2, backbone=BackboneSettings(str(tmp_path / "missing.pt")), **SMALL)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        FasterRCNN(2, backbone=BackboneSettings(str(garbage)), **SMALL)
    partial = tmp_path / "partial.pt"
    state = fake_vgg_state()
    del state["features.10.weight"]
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"features\.10\.weight is missing"):
        FasterRCNN(2, backbone=BackboneSettings(str(partial)), **SMALL)


#: End of each VGG-16 conv block in ``vgg16().features``, after its max-pool, written out:
#: conv1 0-4, conv2 5-9, conv3 10-16, conv4 17-23, conv5 24-29 (no last pool).
BLOCK_ENDS = (0, 5, 10, 17, 24, 30)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local VGG-16 state dict with random values (as a user's own weights file)."""
    path = tmp_path_factory.mktemp("weights") / "vgg.pt"
    torch.save(fake_vgg_state(), path)
    return path


def frozen_names(model: FasterRCNN) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def torchvision_block_names(blocks: int) -> set[str]:
    """Parameter names of torchvision's own ``vgg16().features[:end]``, as the model's."""
    with torch.device("meta"):
        reference = vgg16().features[: BLOCK_ENDS[blocks]]
    return {f"backbone.features.{k}" for k in reference.state_dict()}


def test_pretrained_weights_freeze_conv1_and_conv2_by_default(vgg_file: Path, no_download: Path) -> None:
    model = FasterRCNN(2, backbone=BackboneSettings(str(vgg_file)), **SMALL).train()
    assert model.config["backbone"]["freeze_blocks"] == 2
    assert frozen_names(model) == torchvision_block_names(2)  # features[:10]: 4 convs
    assert len(frozen_names(model)) == 8
    target = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
    sum(model(torch.rand(1, 3, 64, 64), target).values()).backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == torchvision_block_names(2)  # the rest all train


@pytest.mark.parametrize("blocks", [0, 3, 5])
def test_pretrained_weights_freeze_the_blocks_asked_for(blocks: int, vgg_file: Path,
                                                        no_download: Path) -> None:
    model = FasterRCNN(2, backbone=BackboneSettings(str(vgg_file), blocks), **SMALL)
    assert frozen_names(model) == torchvision_block_names(blocks)


def test_random_weights_freeze_nothing_and_bad_block_counts_are_refused() -> None:
    assert frozen_names(FasterRCNN(2, backbone=BackboneSettings(freeze_blocks=5), **SMALL)) == set()
    for bad in (6, -1):
        with pytest.raises(ValueError, match="backbone.freeze_blocks"):
            FasterRCNN(2, backbone=BackboneSettings(freeze_blocks=bad), **SMALL)
