"""``frcnn evaluate``: proposal recall of the trained RPN, detection mAP of the full detector.

Inputs (paths from the config, mirrored by ``dvc.yaml``):
- ``data.out_dir``/``<split>.parquet`` and ``classes.json`` for each split of ``eval.splits``;
- ``train.rpn_model``: the trained RPN (stage ``train_rpn``); its proposals are scored for
  recall, and its anchors give the anchor baseline;
- ``train.frcnn_model``: the full detector (stage ``train_frcnn``), scored for mAP.

Outputs (``R = eval.reports_dir``, all written atomically):
- ``R/proposal_recall.parquet``: one row per (split, image, ground-truth box, budget), columns
  :data:`pipeline.recall.TABLE_COLUMNS`; budgets from ``eval.proposal_budgets``, plus one row
  per box with ``budget = -1``: the best IoU over **all** anchors of the image (unranked, raw:
  neither clipped nor filtered), the anchor baseline.
- ``R/recall_summary.parquet``: :data:`pipeline.recall.SUMMARY_COLUMNS`: recall at IoU
  0.50:0.05:0.95 and AR per (split, budget, size bucket); ``num_proposals`` is the mean number of
  proposals the RPN actually returned at that budget (the anchor count for ``budget = -1``).
- ``R/plots/recall_vs_iou.csv`` (``iou, top<N>...`` one column per budget, ``anchors``: one
  line each in DVC's line template), ``R/plots/recall_vs_proposals.csv`` (``budget, recall@0.5,
  recall@0.7``), with PNGs of the same names: the first split of ``eval.splits`` (the headline
  split, ``test`` by default).
- ``R/pictures/<split>_<image_id>.png``: ``eval.num_pictures`` images of the headline split
  with ground truth (green), the top :data:`PICTURE_PROPOSALS` proposals (blue) and the top
  :data:`PICTURE_DETECTIONS` detections (red).
- ``eval.metrics_path`` (DVC metrics), headline split at the top level, every other split
  nested under its name: ``recall@0.5/300``, ``recall@0.7/300``, ``AR@<N>`` for every budget,
  ``anchors/recall@0.5``, ``anchors/recall@0.7``, ``anchors/AR``, ``mAP@0.5`` (PASCAL VOC
  all-point, ``difficult`` ignored) and ``AP@0.5/<class>``; ``num_images``, ``num_gt``.
  A value that cannot be computed (no box, a budget not evaluated) is left out.

Recall counts ``difficult`` boxes (see :mod:`pipeline.recall`); mAP ignores them.

The core is :func:`evaluate_model` (models and tables in, results out, no files); :func:`run`
adds loading, writing and MLflow logging (the ``evaluate`` run, metrics under MLflow-safe names:
``@`` becomes ``_at_``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pipeline import io, plots
from pipeline import recall as R
from pipeline.config import Config
from pipeline.data import DetectionDataset, collate, decode_image, read_classes
from pipeline.voc_ap import ClassResult, evaluate_detections, mean_ap

PICTURE_PROPOSALS = 10
PICTURE_DETECTIONS = 10
CURVE_THRESHOLDS = (0.5, 0.7)


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class SplitData:
    """A prepared split as the evaluation reads it: ground truth in table order, and the
    images exactly as training feeds them to the model (:class:`pipeline.data.DetectionDataset`,
    no flips)."""

    name: str
    path: Path
    image_ids: list[str]
    boxes: list[Tensor]        # (G, 4) float32 each
    labels: list[Tensor]       # (G,) int64 each
    difficult: list[Tensor]    # (G,) bool each

    def __len__(self) -> int:
        return len(self.image_ids)

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[tuple[range, Tensor]]:
        """``(indices, model input (B, 3, S, S))`` in table order."""
        dataset = DetectionDataset(self.path, hflip=0.0, use_difficult=True)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                            num_workers=num_workers)
        start = 0
        for batch in loader:
            idx = range(start, start + len(batch["image_ids"]))
            if list(batch["image_ids"]) != self.image_ids[idx.start:idx.stop]:  # same table
                raise RuntimeError(f"{self.path}: images and ground truth out of step at row "
                                   f"{start}")
            yield idx, batch["images"]
            start = idx.stop

    def read_images(self, indices: Sequence[int]) -> list[Image.Image]:
        """Images ``indices`` as stored (RGB, S x S), for drawing."""
        column = pq.read_table(self.path, columns=["image"]).column("image")
        out = []
        for i in indices:
            # (3, S, S) float in [0, 1] -> (S, S, 3) uint8
            rgb = decode_image(column[i].as_py()).mul(255).round().byte().permute(1, 2, 0)
            out.append(Image.fromarray(rgb.numpy()))
        return out


def read_split(path: str | Path, name: str) -> SplitData:
    """Read the ground truth of a prepared table (``image_id, boxes, labels, difficult``).

    Raises:
        FileNotFoundError: naming the path (run ``frcnn prepare``).
        ValueError: a column is missing or boxes, labels and flags disagree in an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prepared {name!r} split not found; run `frcnn prepare`")
    columns = ["image_id", "image", "boxes", "labels", "difficult"]
    missing = [c for c in columns if c not in pq.read_schema(path).names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    rows = pq.read_table(path, columns=columns[:1] + columns[2:]).to_pydict()
    boxes, labels, difficult = [], [], []
    for image_id, b, lab, d in zip(rows["image_id"], rows["boxes"], rows["labels"],
                                   rows["difficult"]):
        boxes.append(torch.tensor(b or [], dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor(lab or [], dtype=torch.int64).reshape(-1))
        flags = d if d is not None else [False] * len(labels[-1])
        difficult.append(torch.tensor(flags, dtype=torch.bool).reshape(-1))
        if not boxes[-1].shape[0] == labels[-1].shape[0] == difficult[-1].shape[0]:
            raise ValueError(f"{path}: image {image_id!r} has {boxes[-1].shape[0]} boxes, "
                             f"{labels[-1].shape[0]} labels, {difficult[-1].shape[0]} flags")
    return SplitData(name, path, [str(i) for i in rows["image_id"]], boxes, labels, difficult)


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


def model_anchors(model: nn.Module, image_size: int, device: torch.device) -> Tensor:
    """All ``(A, 4)`` anchors of a ``image_size`` x ``image_size`` input, as the model makes them
    (feature map ``image_size // stride`` on a side: VGG-16's four 2x2 poolings floor)."""
    gen = model.rpn.anchor_generator
    side = image_size // gen.stride
    return gen((side, side), device)


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
                   splits: Sequence[SplitData], budgets: Sequence[int], num_classes: int,
                   image_size: int, batch_size: int = 2, device: torch.device | str = "cpu",
                   num_pictures: int = 0, num_workers: int = 0,
                   progress: bool = True) -> EvalResults:
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

    Returns:
        :class:`EvalResults`.
    """
    from tqdm import tqdm

    budgets = R.check_budgets(budgets)
    device = torch.device(device)
    rpn_model.eval().to(device)
    if detector is not None:
        detector.eval().to(device)
    anchors = model_anchors(rpn_model, image_size, device)

    rows, counts, ap, num_images, pictures = [], {}, {}, {}, []
    for split_index, split in enumerate(splits):
        kept = np.zeros(len(budgets))                # proposals available at each budget, summed
        detections, truths = [], []
        bar = tqdm(split.batches(batch_size, num_workers), desc=f"evaluate {split.name}",
                   total=math.ceil(len(split) / batch_size), unit="batch", disable=not progress)
        for idx, images in bar:
            images = images.to(device, non_blocking=True)
            with torch.inference_mode(), proposal_top_n(rpn_model, max(budgets)):
                props = rpn_model.propose(images)          # per image (boxes, scores), best first
            with torch.inference_mode():
                dets = detector(images) if detector is not None else [None] * len(idx)
            for i, (boxes, _), det in zip(idx, props, dets):
                gt = split.boxes[i].to(device)
                kept += np.minimum(np.asarray(budgets), boxes.shape[0])
                common = dict(image_id=split.image_ids[i], split=split.name,
                              gt_boxes=split.boxes[i], labels=split.labels[i],
                              difficult=split.difficult[i])
                rows.append(R.image_recall_rows(
                    **common, budgets=budgets, best_iou=R.best_iou_at_budgets(gt, boxes, budgets)))
                rows.append(R.image_recall_rows(
                    **common, budgets=[R.ANCHOR_BUDGET],
                    best_iou=R.best_iou_all(gt, anchors)[:, None]))
                if det is not None:
                    detections.append({k: det[k].detach().cpu()
                                       for k in ("boxes", "scores", "labels")})
                    truths.append({"boxes": split.boxes[i], "labels": split.labels[i],
                                   "difficult": split.difficult[i]})
                if split_index == 0 and len(pictures) < num_pictures:
                    pictures.append(_picture(split, i, boxes, det))
        if split_index == 0:
            for pic, image in zip(pictures, split.read_images([p.index for p in pictures])):
                pic.image = image
        n = max(len(split), 1)
        counts |= {(split.name, b): kept[j] / n for j, b in enumerate(budgets)}
        counts[(split.name, R.ANCHOR_BUDGET)] = anchors.shape[0]
        num_images[split.name] = len(split)
        if detector is not None:
            ap[split.name] = evaluate_detections(detections, truths, num_classes)
    table = R.recall_table(rows)
    summary = R.summarize(table, image_size=image_size, num_proposals=counts)
    return EvalResults(table=table, summary=summary, ap=ap, num_images=num_images,
                       pictures=pictures)


def _picture(split: SplitData, i: int, proposals: Tensor,
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


# --------------------------------------------------------------------------------------------
# Metrics


def split_metrics(summary: pd.DataFrame, split: str, budgets: Sequence[int],
                  ap: Mapping[int, ClassResult] | None, class_names: Sequence[str]
                  ) -> dict[str, float]:
    """The DVC / MLflow metrics of one split (see the module docstring for the names)."""
    out: dict[str, float] = {}

    def put(key: str, value: float) -> None:
        if not math.isnan(value):
            out[key] = round(float(value), 6)

    for t in CURVE_THRESHOLDS:
        put(f"recall@{t:g}/300", R.lookup(summary, split=split, budget=300, metric="recall",
                                          iou_threshold=t))
    for b in sorted(budgets):
        put(f"AR@{b}", R.lookup(summary, split=split, budget=b, metric="AR"))
    for t in CURVE_THRESHOLDS:
        put(f"anchors/recall@{t:g}", R.lookup(summary, split=split, budget=R.ANCHOR_BUDGET,
                                               metric="recall", iou_threshold=t))
    put("anchors/AR", R.lookup(summary, split=split, budget=R.ANCHOR_BUDGET, metric="AR"))
    if ap is not None:
        put("mAP@0.5", mean_ap(ap))
        for k, result in ap.items():
            name = class_names[k - 1] if k <= len(class_names) else str(k)
            put(f"AP@0.5/{name}", result.ap)
    sel = summary[(summary["split"] == split) & (summary["size"] == "all")
                  & (summary["budget"] == R.ANCHOR_BUDGET) & (summary["metric"] == "AR")]
    if len(sel):
        out["num_gt"] = int(sel["num_gt"].iloc[0])
    return out


def metrics(results: EvalResults, split_names: Sequence[str], budgets: Sequence[int],
            class_names: Sequence[str]) -> dict[str, Any]:
    """Headline split's metrics at the top level, the others nested under their names."""
    out: dict[str, Any] = {}
    for i, split in enumerate(split_names):
        values = split_metrics(results.summary, split, budgets, results.ap.get(split), class_names)
        values["num_images"] = results.num_images.get(split, 0)
        if i == 0:
            out.update(values)
        else:
            out[split] = values
    return out


def mlflow_metrics(nested: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten :func:`metrics` to MLflow-valid names: ``val.AR@300`` -> ``val/AR_at_300``
    (``@`` -> ``_at_``; characters MLflow refuses -> ``_``)."""
    out: dict[str, float] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(mlflow_metrics(value, prefix=f"{name}/"))
        else:
            out[re.sub(r"[^\w./\- :]", "_", name.replace("@", "_at_"))] = float(value)
    return out


# --------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class OutputPaths:
    """Where the stage writes (from ``eval.reports_dir`` and ``eval.metrics_path``)."""

    reports: Path
    metrics: Path

    @property
    def recall_table(self) -> Path:
        return self.reports / "proposal_recall.parquet"

    @property
    def recall_summary(self) -> Path:
        return self.reports / "recall_summary.parquet"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def pictures(self) -> Path:
        return self.reports / "pictures"

    @classmethod
    def from_config(cls, cfg: Config) -> "OutputPaths":
        return cls(Path(cfg.eval.reports_dir), Path(cfg.eval.metrics_path))


def write_outputs(results: EvalResults, values: Mapping[str, Any], paths: OutputPaths,
                  headline_split: str, class_names: Sequence[str]) -> list[Path]:
    """Write every output file; return their paths (for MLflow)."""
    written = []
    io.write_parquet(paths.recall_table, results.table)
    io.write_parquet(paths.recall_summary, results.summary)
    written += [paths.recall_table, paths.recall_summary]

    iou_curve = R.recall_vs_iou(results.summary, headline_split)
    prop_curve = R.recall_vs_proposals(results.summary, headline_split, CURVE_THRESHOLDS)
    anchors = {f"recall@{t:g}": R.lookup(results.summary, split=headline_split,
                                         budget=R.ANCHOR_BUDGET, metric="recall", iou_threshold=t)
               for t in CURVE_THRESHOLDS}
    for name, frame in (("recall_vs_iou", R.iou_curve_columns(iou_curve)),
                        ("recall_vs_proposals", prop_curve)):
        io.write_text(paths.plots / f"{name}.csv", frame.to_csv(index=False, float_format="%.6g"))
        written.append(paths.plots / f"{name}.csv")
    title = f"{headline_split} split"
    written.append(plots.plot_recall_vs_iou(iou_curve, paths.plots / "recall_vs_iou.png",
                                            title=f"Recall vs IoU ({title})"))
    written.append(plots.plot_recall_vs_proposals(
        prop_curve, paths.plots / "recall_vs_proposals.png",
        anchors={k: v for k, v in anchors.items() if not math.isnan(v)},
        title=f"Recall vs number of proposals ({title})"))

    with io.atomic_dir(paths.pictures) as tmp:
        for pic in results.pictures:
            drawn = plots.draw_boxes(pic.image, gt_boxes=pic.gt_boxes, gt_labels=pic.gt_labels,
                                     proposals=pic.proposals, det_boxes=pic.det_boxes,
                                     det_scores=pic.det_scores, det_labels=pic.det_labels,
                                     class_names=class_names)
            plots.save_image(drawn, tmp / f"{pic.split}_{_safe_name(pic.image_id)}.png")
    written += sorted(paths.pictures.glob("*.png"))

    io.write_json(paths.metrics, dict(values))
    written.append(paths.metrics)
    return written


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.\-]", "_", text)[:120]


# --------------------------------------------------------------------------------------------
# The stage


def load_models(cfg: Config, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """``(rpn model, full detector)`` from ``train.rpn_model`` and ``train.frcnn_model``.

    Raises:
        FileNotFoundError: naming the missing model file and the stage that writes it.
        ValueError: a file is not a readable checkpoint (see
            :func:`detector.serialization.load_model`).
    """
    from detector.serialization import load_model

    models = []
    for path, stage in ((cfg.train.rpn_model, "rpn"), (cfg.train.frcnn_model, "frcnn")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: model not found; train it first "
                                    f"(`frcnn train --stage {stage}`, DVC stage train_{stage})")
        models.append(load_model(path, map_location=device)[0])
    return models[0], models[1]


def _check_compatible(model: nn.Module, path: str, image_size: int, num_classes: int) -> None:
    """The model was built for the prepared images and classes (else a clear error)."""
    if model.image_size != image_size or model.num_classes != num_classes:
        raise ValueError(f"{path}: model built for {model.image_size}x{model.image_size} images "
                         f"and {model.num_classes} classes, but the prepared data has "
                         f"{image_size}x{image_size} and {num_classes}; re-run training")


def _artifact_dir(path: Path, paths: OutputPaths) -> str:
    """MLflow artifact folder: ``reports/...`` mirrors the reports folder; ``metrics`` else."""
    if paths.reports.resolve() in path.resolve().parents:
        rel = path.resolve().parent.relative_to(paths.reports.resolve())
        return "/".join(("reports",) + rel.parts)
    return "metrics"


def run(cfg: Config, args: argparse.Namespace | None = None) -> int:
    """The ``evaluate`` stage: read, evaluate, write, log to MLflow. Returns the exit code."""
    from pipeline.tracking import stage_run

    paths = OutputPaths.from_config(cfg)
    prepared = Path(cfg.data.out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        budgets = R.check_budgets(cfg.eval.proposal_budgets)
        info = read_classes(prepared)
        class_names = [str(c) for c in info["classes"]]
        image_size = int(info["image_size"])
        splits = [read_split(prepared / f"{name}.parquet", name) for name in cfg.eval.splits]
        rpn_model, detector = load_models(cfg, device)
        _check_compatible(rpn_model, cfg.train.rpn_model, image_size, len(class_names))
        _check_compatible(detector, cfg.train.frcnn_model, image_size, len(class_names))
    except (FileNotFoundError, ValueError) as exc:
        print(f"frcnn evaluate: {exc}", file=sys.stderr)
        return 1

    with stage_run(cfg, "evaluate") as tracker:
        results = evaluate_model(rpn_model=rpn_model, detector=detector, splits=splits,
                                 budgets=budgets, num_classes=len(class_names),
                                 image_size=image_size, batch_size=cfg.eval.batch_size,
                                 device=device, num_pictures=cfg.eval.num_pictures,
                                 num_workers=2 if device.type == "cuda" else 0)
        values = metrics(results, list(cfg.eval.splits), budgets, class_names)
        written = write_outputs(results, values, paths, cfg.eval.splits[0], class_names)
        tracker.log_metrics(mlflow_metrics(values))
        for path in written:
            tracker.log_artifact(path, _artifact_dir(path, paths))
    print(format_summary(values))
    return 0


def format_summary(values: Mapping[str, Any]) -> str:
    """The headline metrics, one per line (what ``frcnn evaluate`` prints at the end)."""
    width = max((len(k) for k in values), default=0)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in values.items()
                     if not isinstance(value, Mapping))
