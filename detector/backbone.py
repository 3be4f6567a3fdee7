"""VGG-16 backbone (conv1_1 .. conv5_3 + ReLU) and its optional ImageNet / local weights.

Shapes: ``B`` images. ``(B, 3, S, S)`` normalised images -> ``(B, 512, S/16, S/16)`` features
(four 2x2 max-pools; 640 -> 40).

Weights (``BackboneSettings.weights``):

- ``"none"`` (default): random initialisation (VGG's: Kaiming-normal convs, zero biases);
  nothing is read or downloaded.
- ``"imagenet"``: torchvision's ``VGG16_Weights.IMAGENET1K_V1`` through its weights API, from
  the torch hub cache, downloaded only then; a clear error when neither works.
- a path: a VGG-16 ``state_dict`` saved with ``torch.save`` (keys ``features.<i>.*`` and,
  optionally, ``classifier.0.*`` / ``classifier.3.*``), read with ``weights_only=True``.

The convolutional weights go to :class:`VGG16Backbone`; VGG's fc6 / fc7 (``classifier.0`` and
``classifier.3``) go to the RoI head's ``fc6`` / ``fc7`` when their shapes fit (7 x 7 pooling,
4096 wide), with a warning when they do not.

Blocks: the five conv blocks of VGG-16, each ending after its max-pool (the fifth at conv5_3's
ReLU): ``features[:5]``, ``[5:10]``, ``[10:17]``, ``[17:24]``, ``[24:30]``. py-faster-rcnn freezes
the first two (``features[:10]``, conv1 and conv2) when it starts from ImageNet weights; see
:func:`vgg16_blocks`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn
from torchvision.models import VGG16_Weights
from torchvision.models.vgg import cfgs, make_layers

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VGG16Backbone",
    "apply_vgg16_weights",
    "load_vgg16_state_dict",
    "vgg16_blocks",
    "vgg16_features",
]

#: Modules of ``vgg16().features`` kept: up to conv5_3 and its ReLU, without the last max-pool.
NUM_FEATURE_MODULES = 30
#: Per-channel normalisation of [0, 1] RGB images that the torchvision VGG-16 weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg16_features() -> nn.Sequential:
    """``torchvision.models.vgg16().features[:30]``, VGG-initialised, without building the
    138M-parameter classifier (same modules, same state-dict keys)."""
    features = make_layers(cfgs["D"])[:NUM_FEATURE_MODULES]
    for m in features.modules():
        if isinstance(m, nn.Conv2d):  # the initialisation of torchvision's VGG
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


def vgg16_blocks(features: nn.Sequential, blocks: int) -> nn.Sequential:
    """The first ``blocks`` conv blocks of :func:`vgg16_features` (0 .. 5), sharing its modules:
    ``features[:10]`` for 2. Freeze them with ``vgg16_blocks(features, n).requires_grad_(False)``.

    Raises:
        ValueError: ``blocks`` outside ``0 .. 5``.
    """
    # A block ends after each max-pool; the last one at the end of the features.
    ends = [i + 1 for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)] + [len(features)]
    if not 0 <= blocks <= len(ends):
        raise ValueError(f"backbone.freeze_blocks must be in 0..{len(ends)} (VGG-16 conv blocks), "
                         f"got {blocks}")
    return features[:ends[blocks - 1]] if blocks else features[:0]


class VGG16Backbone(nn.Module):
    """VGG-16 conv1_1 .. conv5_3 (with ReLU): ``(B, 3, H, W) -> (B, 512, H/16, W/16)``."""

    out_channels = 512
    stride = 16

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, 512, H // 16, W // 16)`` features."""
        return self.features(images)


def _imagenet_state_dict() -> dict[str, Tensor]:
    weights = VGG16_Weights.IMAGENET1K_V1
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # network, disk, hash or unpickling trouble: all end the same way
        raise RuntimeError(
            f"backbone.weights='imagenet': torchvision's VGG-16 ImageNet weights are not in the "
            f"torch hub cache ({cache}) and could not be downloaded from {weights.url} "
            f"({type(exc).__name__}: {exc}). Put the file there (or set TORCH_HOME), pass a "
            f"local VGG-16 state dict path as backbone.weights, or use 'none'.") from exc


def load_vgg16_state_dict(weights: str) -> dict[str, Tensor] | None:
    """The VGG-16 state dict named by ``weights`` (``"none"`` -> None; see the module docstring).

    Raises:
        RuntimeError: ``"imagenet"`` when the weights are neither cached nor downloadable.
        ValueError: a path that does not exist or holds no VGG-16 state dict.
    """
    if weights == "none":
        return None
    if weights == "imagenet":
        return _imagenet_state_dict()
    path = Path(weights)
    if not path.is_file():
        raise ValueError(
            f"backbone.weights={weights!r} is not 'none', 'imagenet' or an existing file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"backbone.weights: cannot read a state dict from {path} "
                         f"({type(exc).__name__}: {exc})") from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"backbone.weights: {path} does not hold a state dict of tensors")
    return dict(state)


def apply_vgg16_weights(state: Mapping[str, Tensor], source: str, features: nn.Sequential,
                        fc6: nn.Linear, fc7: nn.Linear) -> None:
    """Copy a VGG-16 state dict into the backbone features and the head's fc6 / fc7.

    Args:
        state: VGG-16 keys (``features.<i>.weight`` ...; ``classifier.0`` / ``classifier.3``
            optional).
        source: where it came from, for messages.
        features: the 30 feature modules; every conv must be present with the right shape.
        fc6, fc7: receive ``classifier.0`` / ``classifier.3`` when present and of their shape.

    Raises:
        ValueError: a convolution missing or of the wrong shape.
    """
    target = features.state_dict()
    conv = {}
    for key, value in target.items():
        src = state.get(f"features.{key}")
        if src is None or src.shape != value.shape:
            got = "missing" if src is None else f"shape {tuple(src.shape)}"
            raise ValueError(f"backbone weights from {source}: features.{key} is {got}, expected "
                             f"{tuple(value.shape)} (not a VGG-16 state dict?)")
        conv[key] = src
    features.load_state_dict(conv)
    for layer, name in ((fc6, "classifier.0"), (fc7, "classifier.3")):
        w, b = state.get(f"{name}.weight"), state.get(f"{name}.bias")
        if w is None or b is None:
            warnings.warn(f"backbone weights from {source} have no {name} (VGG fc): the RoI "
                          f"head's {name} counterpart stays randomly initialised", stacklevel=3)
        elif w.shape != layer.weight.shape or b.shape != layer.bias.shape:
            warnings.warn(f"backbone weights from {source}: {name}.weight has shape "
                          f"{tuple(w.shape)} but the RoI head's layer is "
                          f"{tuple(layer.weight.shape)} (roi_head.pool_size / hidden_dim differ "
                          f"from VGG's 7 / 4096): left randomly initialised", stacklevel=3)
        else:
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
