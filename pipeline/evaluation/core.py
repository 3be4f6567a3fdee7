"""Scoring a model's proposals (and detections) on prepared splits: the evaluation proper.

:func:`evaluate_model` takes models and ground truth in and gives results out, no files: the
``evaluate`` stage (:mod:`pipeline.evaluation.stage`) and the sweep's trials
(:mod:`pipeline.sweep.trial`) both call it. Images are read exactly as training feeds them to
the model (:class:`pipeline.training.loader.DetectionDataset`, no flips).

Per image and budget N, the best IoU of the top-N proposals with each ground-truth box
(:mod:`.recall`), plus the anchor baseline (the best IoU over *all* anchors) and the stride's
ceiling (:mod:`pipeline.anchor_coverage`); detections go to PASCAL VOC AP (:mod:`.voc_ap`).
COCO crowd regions (``crowd``) are left out of recall and ignored by AP; VOC ``difficult`` boxes
count for recall and are ignored by AP. AP ignores both by VOC's rule: a detection whose best
same-class match (by IoU) is one of them counts neither way. COCO matches crowd regions by the
intersection over the *detection's* area instead, so a small detection inside a large crowd
region, which has a low IoU with it, is a false positive here and ignored by COCO's tool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pipeline.anchor_coverage import coverage_rows
from pipeline.evaluation import recall as R
from pipeline.evaluation.voc_ap import ClassResult, evaluate_detections
from pipeline.prepared_table import read_image_bytes
from pipeline.annotations import GroundTruth
from pipeline.training.loader import DetectionDataset, collate

PICTURE_PROPOSALS = 10
PICTURE_DETECTIONS = 10


def image_batches(split: GroundTruth, batch_size: int, num_workers: int = 0
                  ) -> Iterator[tuple[range, Tensor]]:
    """``(row indices, model input (B, 3, S, S))`` of a split, in table order."""
    dataset = DetectionDataset(split.path, hflip=0.0, use_difficult=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                        num_workers=num_workers)
    start = 0
    for batch in loader:
        idx = range(start, start + len(batch["image_ids"]))
        if list(batch["image_ids"]) != split.image_ids[idx.start:idx.stop]:  # same table
            raise RuntimeError(f"{split.path}: images and ground truth out of step at row "
                               f"{start}")
        yield idx, batch["images"]
        start = idx.stop


def read_images(split: GroundTruth, indices: Sequence[int]) -> list[Image.Image]:
    """Images ``indices`` of a split as stored (RGB, S x S), for drawing."""
    import io

    out = []
    for data in read_image_bytes(split.path, list(indices)):  # only their row groups
        with Image.open(io.BytesIO(data)) as image:
            out.append(image.convert("RGB"))
    return out


# --------------------------------------------------------------------------------------------
# Model access (the few places that know the detector's interface)



@contextlib.contextmanager
def proposal_top_n(model: nn.Module, top_n: int) -> Iterator[None]:
    """Inside the block, the model's eval-mode proposal layer keeps ``top_n`` proposals after
    NMS (and at least as many before it), so budgets up to ``top_n`` can be scored; the saved
    settings come back afterwards (the same model may also serve detection)."""
    rpn = model.rpn
    saved = rpn.proposal_settings
    rpn.proposal_settings = dataclasses.replace(
        saved, post_nms_top_n_test=int(top_n),
        pre_nms_top_n_test=max(saved.pre_nms_top_n_test, int(top_n)))
    try:
        yield
    finally:
        rpn.proposal_settings = saved


# --------------------------------------------------------------------------------------------
# The evaluation proper



@dataclass
class Picture:
    """One image to draw: resized-frame boxes."""

    split: str
    index: int                         # row in the split's table
    image_id: str
    image: Image.Image | None          # read after the split's loop, all at once
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    proposals: np.ndarray
    det_boxes: np.ndarray
    det_scores: np.ndarray
    det_labels: np.ndarray


@dataclass
class EvalResults:
    """What :func:`evaluate_model` found; :func:`write_outputs` turns it into files."""

    table: pd.DataFrame                       # proposal_recall rows
    summary: pd.DataFrame                     # recall_summary rows
    ap: dict[str, dict[int, ClassResult]]     # split -> class id -> AP
    num_images: dict[str, int]
    pictures: list[Picture] = field(default_factory=list)


def evaluate_model(*, rpn_model: nn.Module, detector: nn.Module | None,
                   splits: Sequence[GroundTruth], budgets: Sequence[int], num_classes: int,
                   image_size: int, batch_size: int = 2, device: torch.device | str = "cpu",
                   num_pictures: int = 0, num_workers: int = 0,
                   progress: bool = True, class_names: Sequence[str] = ()) -> EvalResults:
    """Score proposals (and detections) of every split.

    Args:
        rpn_model: gives proposals (``propose``, its top-N raised to ``max(budgets)``) and
            anchors; put in eval mode here.
        detector: the full model for mAP (eval mode), or None to skip detection.
        splits: the prepared splits; the first is the headline split (pictures).
        budgets: proposal budgets N.
        num_classes: K.
        image_size: S of the prepared images.
        num_pictures: images of the first split to keep for drawing.
        num_workers: image-decoding processes.
        class_names: names of labels 1..K, for the per-class rows of the summary.

    Returns:
        :class:`EvalResults`.
    """
    from tqdm import tqdm

    budgets = R.check_budgets(budgets)
    device = torch.device(device)
    rpn_model.eval().to(device)
    if detector is not None:
        detector.eval().to(device)
    generator = rpn_model.rpn.anchor_generator
    num_anchors = generator.num_anchors(image_size)

    rows, counts, ap, num_images, pictures = [], {}, {}, {}, []
    for split_index, split in enumerate(splits):
        kept = np.zeros(len(budgets))                # proposals available at each budget, summed
        detections, truths = [], []
        bar = tqdm(image_batches(split, batch_size, num_workers), desc=f"evaluate {split.name}",
                   total=math.ceil(len(split) / batch_size), unit="batch", disable=not progress)
        for idx, images in bar:
            images = images.to(device, non_blocking=True)
            with torch.inference_mode(), proposal_top_n(rpn_model, max(budgets)):
                props = rpn_model.propose(images)          # per image (boxes, scores), best first
            with torch.inference_mode():
                dets = detector(images) if detector is not None else [None] * len(idx)
            for i, (boxes, _), det in zip(idx, props, dets):
                counted = ~split.crowd[i]            # crowd regions: no recall to find
                gt = split.boxes[i][counted].to(device)
                kept += np.minimum(np.asarray(budgets), boxes.shape[0])
                rows.append(R.image_recall_rows(
                    image_id=split.image_ids[i], split=split.name, gt_boxes=split.boxes[i][counted],
                    labels=split.labels[i][counted], difficult=split.difficult[i][counted],
                    gt_index=torch.nonzero(counted).flatten(),
                    budgets=budgets, best_iou=R.best_iou_at_budgets(gt, boxes, budgets)))
                if det is not None:
                    detections.append({k: det[k].detach().cpu()
                                       for k in ("boxes", "scores", "labels")})
                    # AP ignores difficult boxes and crowd regions alike (a detection on one is
                    # neither right nor wrong), as VOC's and COCO's evaluations do
                    truths.append({"boxes": split.boxes[i], "labels": split.labels[i],
                                   "difficult": split.difficult[i] | split.crowd[i]})
                if split_index == 0 and len(pictures) < num_pictures:
                    pictures.append(_picture(split, i, boxes, det))
        if split_index == 0:
            for pic, image in zip(pictures, read_images(split, [p.index for p in pictures])):
                pic.image = image
        n = max(len(split), 1)
        counts |= {(split.name, b): kept[j] / n for j, b in enumerate(budgets)}
        counts[(split.name, R.ANCHOR_BUDGET)] = num_anchors
        # the anchor-only baseline and the stride's ceiling (crowd regions left out)
        rows += coverage_rows(split, generator.sizes, stride=generator.stride,
                              image_size=image_size)
        num_images[split.name] = len(split)
        if detector is not None:
            ap[split.name] = evaluate_detections(detections, truths, num_classes)
    table = R.recall_table(rows)
    summary = R.summarize(table, image_size=image_size, num_proposals=counts,
                          class_names=class_names)
    return EvalResults(table=table, summary=summary, ap=ap, num_images=num_images,
                       pictures=pictures)


def _picture(split: GroundTruth, i: int, proposals: Tensor,
             det: Mapping[str, Tensor] | None) -> Picture:
    if det is not None:
        top = torch.argsort(det["scores"], descending=True)[:PICTURE_DETECTIONS]
        det_boxes, det_scores, det_labels = (det[k][top].cpu().numpy()
                                             for k in ("boxes", "scores", "labels"))
    else:
        det_boxes, det_scores, det_labels = np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int)
    return Picture(split=split.name, index=i, image_id=split.image_ids[i], image=None,
                   gt_boxes=split.boxes[i].numpy(), gt_labels=split.labels[i].numpy(),
                   proposals=proposals[:PICTURE_PROPOSALS].detach().cpu().numpy(),
                   det_boxes=det_boxes, det_scores=det_scores, det_labels=det_labels)
