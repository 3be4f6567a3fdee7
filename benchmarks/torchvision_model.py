"""torchvision's ``FasterRCNN`` assembled with this detector's parts, for side-by-side benchmarks.

:func:`build_torchvision` reads an existing :class:`detector.FasterRCNN`'s ``config`` and builds
torchvision's model with the same VGG-16 ``features[:30]`` backbone, anchors, RPN sampling,
proposal layer (NMS, pre / post-NMS top-N of training and test, minimum size), RoI sampling,
RoI align (7 x 7, sampling ratio 2), fc6 / fc7, classifier, box regressor, score threshold,
detection NMS and detection count. With ``same_geometry=True`` (what a quality comparison
needs) it also removes the two differences of geometry:

- anchors: :class:`CentredAnchorGenerator` centres them on the cells' centres and does not round
  their sizes, as :mod:`detector.anchors` does (torchvision's own: cells' corners, rounded);
- input: :class:`NoResizeTransform` normalises with the ImageNet statistics this detector uses
  and neither resizes nor pads (torchvision's own interpolates even at scale 1 and pads to a
  multiple of 32);
- RoI align: :class:`AlignedRoIPool` samples with ``aligned=True`` as this detector does (cell
  ``j`` read at its centre ``16 j + 8``, where the anchors sit); torchvision's
  ``MultiScaleRoIAlign`` has ``aligned=False``, half a cell away.

:func:`copy_weights` then copies every tensor of this detector into it (initialisation that is
identical, not just alike), and :func:`compare_outputs` measures how far the two models' outputs
are apart on one batch (features, RPN objectness and offsets, anchors, head logits and offsets).

Differences that remain by design (torchvision's choices, not settings):

- RPN objectness: one logit per anchor with a sigmoid / binary cross-entropy in torchvision; two
  (background, object) with a softmax / cross-entropy here. :func:`copy_weights` maps them
  exactly (``w_tv = w_object - w_background``), and the loss of a logit difference ``l`` is the
  same function in both; but SGD moves both of this detector's rows, so the difference ``l``
  moves twice as far per step as torchvision's single row: this detector's objectness learns
  at twice the effective learning rate.
  :func:`objectness_param_groups` gives torchvision's objectness logit the optimiser settings
  (learning rate x 2, weight decay / 2) under which SGD with momentum moves it exactly as it
  moves this detector's logit difference (up to gradient clipping), for an ablation.
- Fast R-CNN head box loss: smooth L1 with ``beta = 1/9`` in torchvision, ``beta = 1`` here (the
  original Fast R-CNN's); both divided by the number of sampled RoIs.
  :func:`head_smooth_l1_beta` sets torchvision's, for an ablation.
- Proposal layer: torchvision takes the pre-NMS top-N *before* dropping boxes under the minimum
  size, this detector after; the same whenever the anchors are at most pre-NMS top-N (e.g.
  4,800 anchors at 320 x 320 with 12 per cell).
- Border-crossing anchors: torchvision always trains on them; this detector does when
  ``rpn_allow_border < 0`` (build it so for a like-for-like comparison).
- Dropout in fc6 / fc7: torchvision's ``TwoMLPHead`` has none; when this detector's head has
  (``nn.Dropout`` modules or a ``*dropout*`` config key), :class:`DropoutTwoMLPHead` adds the
  same probability after each ReLU (identical in eval mode; in training the masks differ).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align

from detector import FasterRCNN
from detector.settings import flat_config
from detector.backbone import IMAGENET_MEAN, IMAGENET_STD, vgg16_features
from detector.roi_heads import ROI_BOX_WEIGHTS
from detector.rpn import RPN_BOX_WEIGHTS, flatten_head_output

__all__ = ["CentredAnchorGenerator", "DropoutTwoMLPHead", "NoResizeTransform", "build_torchvision",
           "compare_outputs", "copy_weights", "head_dropout", "head_smooth_l1_beta",
           "objectness_param_groups", "torchvision_rpn_outputs"]


class CentredAnchorGenerator(TVAnchorGenerator):
    """torchvision's ``AnchorGenerator`` with this detector's geometry: cell anchors not rounded
    to whole pixels, and centred on the cells' centres (shifted by half a stride)."""

    def generate_anchors(self, scales: list[int], aspect_ratios: list[float],
                         dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> Tensor:
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios_t = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios_t)
        w_ratios = 1 / h_ratios
        # (R, 1) * (1, S) -> (R*S,): ratio-major, like torchvision's and detector.anchors'
        ws = (w_ratios[:, None] * scales_t[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales_t[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # (a, 4), not rounded

    def grid_anchors(self, grid_sizes: list[list[int]],
                     strides: list[list[Tensor]]) -> list[Tensor]:
        anchors = super().grid_anchors(grid_sizes, strides)  # centred on the cells' corners
        out = []
        for level, (stride_h, stride_w) in zip(anchors, strides):
            half = torch.stack([stride_w, stride_h, stride_w, stride_h]).to(level) / 2
            out.append(level + half)
        return out


class NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform that only normalises: no resize (the images are already the
    model's size) and no padding (``size_divisible=1``)."""

    def __init__(self, image_size: int) -> None:
        super().__init__(image_size, image_size, list(IMAGENET_MEAN), list(IMAGENET_STD),
                         size_divisible=1)

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target


class AlignedRoIPool(nn.Module):
    """One feature map's RoI align with ``aligned=True``, in the interface of torchvision's
    ``MultiScaleRoIAlign`` (``features`` by name, per-image ``(R_i, 4)`` boxes, image sizes)."""

    def __init__(self, output_size: int, sampling_ratio: int, stride: int) -> None:
        super().__init__()
        self.output_size, self.sampling_ratio = output_size, sampling_ratio
        self.spatial_scale = 1.0 / stride

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        return roi_align(features["0"].float(), [p.float() for p in proposals], self.output_size,
                         self.spatial_scale, self.sampling_ratio, aligned=True)


class DropoutTwoMLPHead(TwoMLPHead):
    """``TwoMLPHead`` with dropout after each ReLU (VGG's fc6 -> ReLU -> dropout -> fc7 -> ReLU
    -> dropout)."""

    def __init__(self, in_channels: int, representation_size: int, p: float) -> None:
        super().__init__(in_channels, representation_size)
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(F.relu(self.fc6(x.flatten(start_dim=1))), self.p, self.training)
        return F.dropout(F.relu(self.fc7(x)), self.p, self.training)


def head_dropout(ours: FasterRCNN) -> float:
    """Dropout probability of this detector's fc6 / fc7 (0 when it has none)."""
    for key, value in ours.config.items():
        if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    probs = [m.p for m in ours.roi_heads.modules() if isinstance(m, nn.Dropout)]
    return float(probs[0]) if probs else 0.0


def build_torchvision(ours: FasterRCNN, *, same_geometry: bool = True) -> TVFasterRCNN:
    """torchvision's FasterRCNN with the settings of ``ours`` (read from its ``config``), random
    weights (copy them with :func:`copy_weights`). See the module docstring."""
    c = flat_config(ours.config)
    size = ours.image_size
    backbone = vgg16_features()
    backbone.out_channels = 512
    anchor_sizes = tuple(s * c["anchor_stride"] for s in c["anchor_scales"])
    ratios = tuple(c["anchor_ratios"])
    if same_geometry:
        anchor_generator = CentredAnchorGenerator((anchor_sizes,), (ratios,))
    else:
        anchor_generator = TVAnchorGenerator((tuple(int(s) for s in anchor_sizes),), (ratios,))
    # Built in this order (RPN head, box head, predictor), the modules draw their random
    # initialisation as they always did: the speed benchmark's models stay the same.
    rpn_head = TVRPNHead(512, len(anchor_sizes) * len(ratios))
    dropout = head_dropout(ours)
    in_features = 512 * c["roi_pool_size"] ** 2
    box_head = (DropoutTwoMLPHead(in_features, c["roi_hidden_dim"], dropout) if dropout > 0
                else TwoMLPHead(in_features, c["roi_hidden_dim"]))
    model = TVFasterRCNN(
        backbone, num_classes=None,
        min_size=size, max_size=size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchor_generator,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=c["rpn_pre_nms_top_n_train"],
        rpn_post_nms_top_n_train=c["rpn_post_nms_top_n_train"],
        rpn_pre_nms_top_n_test=c["rpn_pre_nms_top_n_test"],
        rpn_post_nms_top_n_test=c["rpn_post_nms_top_n_test"],
        rpn_nms_thresh=c["rpn_nms_iou"], rpn_fg_iou_thresh=c["rpn_pos_iou"],
        rpn_bg_iou_thresh=c["rpn_neg_iou"], rpn_batch_size_per_image=c["rpn_num_samples"],
        rpn_positive_fraction=c["rpn_pos_fraction"],
        box_roi_pool=MultiScaleRoIAlign(["0"], c["roi_pool_size"], 2),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(c["roi_hidden_dim"], ours.num_classes + 1),
        box_score_thresh=c["roi_score_thresh"], box_nms_thresh=c["roi_nms_iou"],
        box_detections_per_img=c["roi_detections_per_image"], box_fg_iou_thresh=c["roi_fg_iou"],
        box_bg_iou_thresh=c["roi_bg_iou_high"], box_batch_size_per_image=c["roi_num_samples"],
        box_positive_fraction=c["roi_fg_fraction"],
    )
    model.rpn.min_size = c["rpn_min_size"]  # torchvision's default is 1e-3 pixels
    if same_geometry:
        model.transform = NoResizeTransform(size)
        model.roi_heads.box_roi_pool = AlignedRoIPool(c["roi_pool_size"], 2, c["anchor_stride"])
    if tuple(model.rpn.box_coder.weights) != RPN_BOX_WEIGHTS or \
            tuple(model.roi_heads.box_coder.weights) != ROI_BOX_WEIGHTS:
        raise RuntimeError(f"box-coder weights differ: torchvision RPN "
                           f"{model.rpn.box_coder.weights}, head "
                           f"{model.roi_heads.box_coder.weights}; this detector "
                           f"{RPN_BOX_WEIGHTS}, {ROI_BOX_WEIGHTS}")
    return model


@torch.no_grad()
def copy_weights(ours: FasterRCNN, tv: TVFasterRCNN) -> int:
    """Copy every tensor of ``ours`` into ``tv`` (built by :func:`build_torchvision`).

    The RPN classifier differs in kind: this detector's has 2 channels per anchor (``j * 2``
    background, ``j * 2 + 1`` object), torchvision's 1 (a sigmoid logit). It gets
    ``w_object - w_background`` and ``b_object - b_background``, so that ``sigmoid(l_tv)``
    equals this detector's softmax object probability.

    Returns:
        The number of torchvision tensors written; every one of them is (else RuntimeError).
    """
    head, roi = ours.rpn.head, ours.roi_heads
    cls_w, cls_b = head.cls.weight, head.cls.bias  # (2a, C, 1, 1), (2a,)
    a = cls_b.shape[0] // 2
    # (2a, C, 1, 1) -> (a, 2, C, 1, 1): [:, 1] object, [:, 0] background of anchor j
    cls_w = cls_w.view(a, 2, *cls_w.shape[1:])
    cls_b = cls_b.view(a, 2)
    state = {f"backbone.{k}": v for k, v in ours.backbone.features.state_dict().items()}
    state |= {
        "rpn.head.conv.0.0.weight": head.conv.weight, "rpn.head.conv.0.0.bias": head.conv.bias,
        "rpn.head.cls_logits.weight": cls_w[:, 1] - cls_w[:, 0],
        "rpn.head.cls_logits.bias": cls_b[:, 1] - cls_b[:, 0],
        "rpn.head.bbox_pred.weight": head.reg.weight, "rpn.head.bbox_pred.bias": head.reg.bias,
        "roi_heads.box_head.fc6.weight": roi.fc6.weight, "roi_heads.box_head.fc6.bias": roi.fc6.bias,
        "roi_heads.box_head.fc7.weight": roi.fc7.weight, "roi_heads.box_head.fc7.bias": roi.fc7.bias,
        "roi_heads.box_predictor.cls_score.weight": roi.cls_score.weight,
        "roi_heads.box_predictor.cls_score.bias": roi.cls_score.bias,
        "roi_heads.box_predictor.bbox_pred.weight": roi.bbox_pred.weight,
        "roi_heads.box_predictor.bbox_pred.bias": roi.bbox_pred.bias,
    }
    target = tv.state_dict()
    missing = sorted(set(target) - set(state))
    unknown = sorted(set(state) - set(target))
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
             if k in target and v.shape != target[k].shape]
    if missing or unknown or wrong:
        raise RuntimeError(f"weights do not map one to one: torchvision tensors not written "
                           f"{missing}, unknown names {unknown}, shapes {wrong}")
    tv.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return len(state)


def torchvision_rpn_outputs(tv: TVFasterRCNN, images: Tensor
                            ) -> tuple[ImageList, Tensor, Tensor, Tensor, list[Tensor]]:
    """torchvision's RPN head on ``(B, 3, S, S)`` 0-1 images, before the proposal layer.

    Returns:
        ``(image_list, features (B, 512, h, w), objectness (B*A, 1), offsets (B*A, 4), anchors
        [B x (A, 4)])``, rows in torchvision's anchor order (cell row-major, ratio-major).
    """
    image_list, _ = tv.transform(list(images))
    features = tv.backbone(image_list.tensors)
    objectness, offsets = tv.rpn.head([features])
    anchors = tv.rpn.anchor_generator(image_list, [features])
    # [(B, a, h, w)], [(B, 4a, h, w)] -> (B*h*w*a, 1), (B*h*w*a, 4)
    objectness, offsets = concat_box_prediction_layers(objectness, offsets)
    return image_list, features, objectness, offsets, anchors


def _relative(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|`` (0 for two zero tensors)."""
    scale = float(b.abs().max())
    diff = float((a.float() - b.float()).abs().max())
    return diff / scale if scale > 0 else diff


@torch.no_grad()
def compare_outputs(ours: FasterRCNN, tv: TVFasterRCNN, images: Tensor,
                    rois: Tensor | None = None) -> dict[str, Any]:
    """How far the two models' outputs are apart on ``images`` (both put in eval mode).

    Args:
        images: ``(B, 3, S, S)`` float in [0, 1].
        rois: ``(B, R, 4)`` boxes for the head's check; default: ``R = 16`` boxes per image
            from a fixed grid.

    Returns:
        ``{name: max |this - torchvision| / max |torchvision|}`` for ``features``, ``objectness``
        (this detector's object - background logit vs torchvision's logit), ``offsets`` (RPN),
        ``head_logits``, ``head_offsets``; ``anchors`` as the largest absolute difference in
        pixels; and ``shapes`` (a string) for the record.
    """
    ours.eval()
    tv.eval()
    b = images.shape[0]
    feats = ours._features(images)  # normalised as the model's forward does
    cls_map, reg_map = ours.rpn.head(feats)
    logits = flatten_head_output(cls_map, 2)  # (B, A, 2)
    deltas = flatten_head_output(reg_map, 4)  # (B, A, 4)
    anchors = ours.rpn.anchor_generator(feats.shape[-2:], feats.device)  # (A, 4)
    image_list, tv_feats, tv_obj, tv_deltas, tv_anchors = torchvision_rpn_outputs(tv, images)
    a = anchors.shape[0]
    out: dict[str, Any] = {
        "features": _relative(feats, tv_feats),
        "objectness": _relative(logits[..., 1] - logits[..., 0], tv_obj.view(b, a)),
        "offsets": _relative(deltas, tv_deltas.view(b, a, 4)),
        "anchors": max(float((anchors - t).abs().max()) for t in tv_anchors),
    }
    if rois is None:
        s = float(images.shape[-1])
        corners = torch.linspace(0.05, 0.6, 4) * s
        x, y = torch.meshgrid(corners, corners, indexing="ij")
        grid = torch.stack((x, y, x + 0.35 * s, y + 0.3 * s), dim=-1).view(1, -1, 4)
        rois = grid.expand(b, -1, -1).to(images.device)
    head_logits, head_deltas = ours.roi_heads.predict(ours.roi_heads.pool_features(feats, rois))
    pooled = tv.roi_heads.box_roi_pool({"0": tv_feats}, list(rois), image_list.image_sizes)
    tv_logits, tv_head_deltas = tv.roi_heads.box_predictor(tv.roi_heads.box_head(pooled))
    out["head_logits"] = _relative(head_logits, tv_logits)
    out["head_offsets"] = _relative(head_deltas.reshape(head_deltas.shape[0], -1),
                                    tv_head_deltas)
    out["shapes"] = (f"features {tuple(feats.shape)}, {a} anchors, "
                     f"{rois.shape[0] * rois.shape[1]} RoIs")
    if not all(math.isfinite(v) for v in out.values() if isinstance(v, float)):
        raise RuntimeError(f"non-finite output comparison: {out}")
    return out


def objectness_param_groups(tv: TVFasterRCNN, lr: float, weight_decay: float
                            ) -> list[dict[str, Any]]:
    """SGD parameter groups in which torchvision's objectness logit trains like this detector's.

    This detector's logit is ``l = (w1 - w0) . x`` (softmax over two rows); the loss is a
    function of ``l`` alone, so the rows get gradients ``+G`` and ``-G`` and SGD (momentum ``m``,
    weight decay ``wd``) moves the difference ``D = w1 - w0`` by ``buf = m buf + 2 G + wd D``,
    ``D -= lr buf``. torchvision's single row ``w`` with learning rate ``2 lr`` and weight decay
    ``wd / 2`` moves the same way (its buffer is half of ``buf``). Gradient clipping, which sees
    ``2 |G|^2`` here and ``|G|^2`` there, is the one thing left apart.

    Returns:
        ``[{"params": everything else}, {"params": cls_logits, "lr": 2 lr, "weight_decay":
        wd / 2}]``.
    """
    cls = list(tv.rpn.head.cls_logits.parameters())
    chosen = {id(p) for p in cls}
    rest = [p for p in tv.parameters() if id(p) not in chosen]
    return [{"params": rest},
            {"params": cls, "lr": 2 * lr, "weight_decay": weight_decay / 2}]


def _fastrcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                   regression_targets: list[Tensor], *, beta: float) -> tuple[Tensor, Tensor]:
    """torchvision's ``roi_heads.fastrcnn_loss`` with the smooth L1 ``beta`` as a parameter
    (torchvision's own is 1/9)."""
    labels_t = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    classification_loss = F.cross_entropy(class_logits, labels_t)
    positive = torch.where(labels_t > 0)[0]
    n = class_logits.shape[0]
    # (R, 4 (K+1)) -> (R, K+1, 4), the true class's offsets of each foreground RoI
    deltas = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    box_loss = F.smooth_l1_loss(deltas[positive, labels_t[positive]], targets[positive],
                                beta=beta, reduction="sum") / labels_t.numel()
    return classification_loss, box_loss


@contextlib.contextmanager
def head_smooth_l1_beta(beta: float | None) -> Iterator[None]:
    """Inside the block, torchvision's Fast R-CNN head box loss uses smooth L1 with ``beta``
    (None: its own 1/9, nothing changed). Patches ``torchvision.models.detection.roi_heads
    .fastrcnn_loss`` for the whole process; restored on exit."""
    if beta is None:
        yield
        return
    saved = tv_roi_heads.fastrcnn_loss
    tv_roi_heads.fastrcnn_loss = lambda *a: _fastrcnn_loss(*a, beta=beta)
    try:
        yield
    finally:
        tv_roi_heads.fastrcnn_loss = saved
