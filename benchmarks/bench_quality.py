"""Does it learn on real images? This detector next to torchvision's FasterRCNN, same start.

Both models are assembled from the same parts (:mod:`benchmarks.torchvision_model`: VGG-16
``features[:30]``, anchors, RPN sampling, proposal layer, RoI sampling, RoI align 7 x 7, fc6 / fc7,
classifier, box regressor, detection settings), start from **identical weights** (this detector is
built first from ``--seed``, its tensors are copied into torchvision's; the script then checks
that both give the same features, RPN objectness and offsets, anchors and head outputs on one
training batch, and stops if they do not), and are trained end to end (RPN + head) on the same
batches of a prepared set: the same images in the same order with the same flips (one loader
feeds both), the same SGD (learning rate, momentum, weight decay), warm-up and cosine schedule
(``pipeline``'s own), gradient clipping, steps and batch size. The two models take turns on each
batch (which one goes first alternates), and each one's training steps are timed on their own
(forward, backward, clipping and the optimiser step; not the data loading).

Both are then scored by the project's own evaluation (``pipeline.evaluation.core.evaluate_model``
with ``pipeline.evaluation.recall`` and ``pipeline.evaluation.voc_ap``) on the test split:
proposals of the RPN in eval mode with its post-NMS top-N raised to the largest budget,
AR@100 / 300 / 1000 (mean recall over IoU 0.50:0.05:0.95 of the top-N proposals), recall@0.5 /
0.7 at 300, detections: mAP@0.5 (PASCAL VOC all-point) and AP per class; and the anchor-only
baseline (best IoU over all anchors, which both models share). torchvision goes through the
same function behind a small adapter (:class:`TorchvisionForEvaluation`).

Data: ``--data DIR`` is a folder written by ``frcnn prepare`` (``classes.json``, ``train.parquet``
and ``<--split>.parquet``). ``--image-size`` must equal its prepared size (``classes.json``): the
script refuses another size rather than resizing, so that both models see exactly the images the
pipeline trains on. Anchors (``--scales`` x 16 px, ``--ratios``) and the RPN's minimum proposal
size (16 px) are given in the 640 x 640 frame and scaled by ``S / 640``, as the sweep does.
The default scales ``2 4 8 16`` (32 - 256 px at 640) fit BCCD: its platelets are ~42 px at 640,
which the spec's ``8 16 32`` (128 - 512 px) do not cover (2 of 49 test platelets at IoU >= 0.5).
Border-crossing anchors are kept for training (``--allow-border -1``, torchvision's behaviour).

Differences that remain between the two models are listed in :mod:`benchmarks.torchvision_model`
(RPN objectness: softmax over 2 vs one sigmoid logit, which makes this detector's objectness
learn at twice the effective learning rate; head smooth L1 beta 1 vs 1/9). Two ablation options
take them away from torchvision's side: ``--tv-objectness-as-softmax`` and ``--tv-head-beta 1``.

Usage::

    frcnn prepare --set data.source=voc:examples/bccd --set data.on_invalid=skip \\
        --set data.split=imagesets --set data.image_size=320 --set data.out_dir=/tmp/bccd320
    python benchmarks/bench_quality.py --data /tmp/bccd320 --image-size 320 --steps 300 \\
        --seed 0 --out quality_320_seed0.json                       # CPU, ~30 min on 2 cores
    python benchmarks/bench_quality.py --data /tmp/bccd640 --image-size 640 --steps 2000 \\
        --batch-size 8 --seed 0 --out quality_640_seed0.json        # GPU

Prints a table (rows: metrics; columns: this detector, torchvision, anchors) with the device,
date and command, and writes ``--out`` as JSON: ``{"this": {...}, "torchvision": {...},
"anchors": {...}, "run": {...}}``; the models' entries hold ``AR@100``, ``AR@300``, ``AR@1000``,
``recall@0.5/300``, ``recall@0.7/300``, ``mAP@0.5``, ``AP@0.5/<class>``, ``train_seconds`` and
more; ``anchors`` holds ``AR``, ``recall@0.5``, ``recall@0.7``, ``num_anchors``; ``run`` the
settings, the initial-weights check and the loss history.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The project's data path, schedule and scoring.
from pipeline.evaluation.core import evaluate_model  # noqa: E402
from pipeline.evaluation.metrics import split_metrics  # noqa: E402
from pipeline.prepared_table import read_classes  # noqa: E402
from pipeline.annotations import read_ground_truth  # noqa: E402
from pipeline.training.loader import DetectionDataset, ResumableSampler, make_loader  # noqa: E402
from pipeline.training.schedule import lr_factor  # noqa: E402

from benchmarks.torchvision_model import (head_smooth_l1_beta,
                                          objectness_param_groups)
from benchmarks.quality_models import (SAME_START_TOLERANCE,  # noqa: E402
                                       TorchvisionForEvaluation, build_models, model_settings)
from benchmarks.quality_report import (BUDGETS, LOSS_TERMS, anchors_entry,  # noqa: E402
                                       device_name, fmt, jsonable, model_entry, table, verdict)

#: torchvision's loss names -> this detector's.
TV_LOSS_NAMES = {"loss_objectness": "rpn_cls", "loss_rpn_box_reg": "rpn_reg",
                 "loss_classifier": "roi_cls", "loss_box_reg": "roi_reg"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path,
                   help="a folder written by `frcnn prepare` (classes.json, train.parquet, "
                        "<split>.parquet)")
    p.add_argument("--image-size", type=int, required=True,
                   help="S; must equal the prepared size (classes.json)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps of each model")
    p.add_argument("--seed", type=int, default=0,
                   help="initial weights, image order, flips and the models' sampling")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--split", default="test", help="the prepared split that is scored")
    p.add_argument("--scales", type=float, nargs="+", default=[2.0, 4.0, 8.0, 16.0],
                   help="anchor scales, times 16 px, in the 640 x 640 frame (scaled by S/640)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                   help="anchor height / width ratios")
    p.add_argument("--allow-border", type=float, default=-1.0,
                   help="this detector's rpn_allow_border; -1 keeps border-crossing anchors "
                        "for training as torchvision does")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=50,
                   help="linear warm-up from lr/1000, then cosine to 0 at the last step")
    p.add_argument("--grad-clip", type=float, default=10.0, help="max gradient norm; 0: off")
    p.add_argument("--hflip", type=float, default=0.5, help="probability of a horizontal flip")
    p.add_argument("--amp", choices=("auto", "off", "bf16"), default="auto",
                   help="autocast (auto: bf16 on CUDA, off on the CPU, as the pipeline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--loader-workers", type=int, default=0, help="image-decoding processes")
    p.add_argument("--eval-batch-size", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10, help="print the losses every N steps")
    p.add_argument("--tv-objectness-as-softmax", action="store_true",
                   help="ablation: torchvision's objectness logit trains with lr x 2 and weight "
                        "decay / 2, which makes SGD move it as it moves this detector's 2-way "
                        "softmax (see benchmarks/torchvision_model.py)")
    p.add_argument("--tv-head-beta", type=float, default=None,
                   help="ablation: smooth L1 beta of torchvision's head box loss (its own: 1/9; "
                        "this detector's: 1)")
    p.add_argument("--score-untrained", action="store_true",
                   help="also score both models before training (they must agree: a check of "
                        "the same start and of torchvision's evaluation adapter; two more "
                        "evaluation passes)")
    return p.parse_args(argv)


# -- models -----------------------------------------------------------------------------------

def training_batches(path: Path, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Batches of the prepared training table, epoch after epoch: a shuffled order and flips
    that depend on ``(seed, epoch)`` only (the pipeline's loader, one process)."""
    dataset = DetectionDataset(path, hflip=args.hflip, seed=args.seed)
    sampler = ResumableSampler(len(dataset), shuffle=True, seed=args.seed)
    loader = make_loader(dataset, sampler, batch_size=args.batch_size,
                         num_workers=args.loader_workers)
    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        yield from loader


# -- training ---------------------------------------------------------------------------------

@dataclass
class Trainee:
    """One model under training: its loss function, optimiser, schedule and clock."""

    name: str
    model: nn.Module
    losses: Callable[[Tensor, list[dict[str, Tensor]]], dict[str, Tensor]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def step(self, images: Tensor, targets: list[dict[str, Tensor]], step: int,
             args: argparse.Namespace, device: torch.device,
             amp: torch.dtype | None) -> dict[str, float]:
        """One optimiser step, timed (a host sync at the end on a GPU)."""
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            losses = self.losses(images, targets)
        loss = sum(losses.values())
        values = {k: float(v.detach()) for k, v in losses.items()}  # host sync
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"{self.name}: non-finite loss at step {step + 1} "
                                     f"(lr {self.optimizer.param_groups[0]['lr']:.2e}): {values}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        sync(device)
        self.seconds += time.perf_counter() - start
        values["loss"] = sum(values.values())
        self.history.append(values)
        return values


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainee(name: str, model: nn.Module, args: argparse.Namespace,
                 device: torch.device) -> Trainee:
    if name == "this":
        def losses(images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
            return model(images, targets)  # targets on the CPU: the model moves them
    else:
        def losses(images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
            on_device = [{k: v.to(device) for k, v in t.items()} for t in targets]
            return {TV_LOSS_NAMES[k]: v for k, v in model(list(images), on_device).items()}
    params: Any = model.parameters()
    if name == "torchvision" and args.tv_objectness_as_softmax:
        params = objectness_param_groups(model, args.lr, args.weight_decay)
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, warmup_steps=args.warmup_steps, total_steps=args.steps, schedule="cosine"))
    return Trainee(name, model, losses, optimizer, scheduler)


def train(trainees: list[Trainee], batches: Iterator[dict[str, Any]], args: argparse.Namespace,
          device: torch.device) -> None:
    """``args.steps`` steps of every trainee on the same batches, taking turns."""
    amp = {"auto": torch.bfloat16 if device.type == "cuda" else None, "off": None,
           "bf16": torch.bfloat16}[args.amp]
    for t in trainees:
        t.model.train()
    wall = time.perf_counter()
    for step in range(args.steps):
        batch = next(batches)
        images = batch["images"].to(device, non_blocking=True)
        order = trainees if step % 2 == 0 else trainees[::-1]
        for t in order:
            t.step(images, batch["targets"], step, args, device, amp)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            lr = trainees[0].optimizer.param_groups[0]["lr"]
            parts = []
            for t in trainees:
                recent = t.history[-args.log_every:]
                mean = {k: sum(h[k] for h in recent) / len(recent) for k in recent[0]}
                terms = " ".join(f"{k} {mean[k]:.3f}" for k in LOSS_TERMS)
                parts.append(f"{t.name}: loss {mean['loss']:.3f} ({terms}) {t.seconds:.0f} s")
            print(f"step {step + 1}/{args.steps} lr {lr:.2e} | " + " | ".join(parts)
                  + f" | wall {time.perf_counter() - wall:.0f} s", flush=True)


# -- scoring ----------------------------------------------------------------------------------

def score(model: nn.Module, split: Any, args: argparse.Namespace, class_names: list[str],
          device: torch.device) -> tuple[dict[str, float], float]:
    """The project's metrics of one model on ``split`` (and the seconds it took)."""
    start = time.perf_counter()
    results = evaluate_model(rpn_model=model, detector=model, splits=[split], budgets=BUDGETS,
                             num_classes=len(class_names), image_size=args.image_size,
                             batch_size=args.eval_batch_size, device=device, progress=False,
                             class_names=class_names)
    values = split_metrics(results.summary, split.name, BUDGETS, results.ap.get(split.name),
                           class_names)
    summary = results.summary
    for budget in BUDGETS:  # mean proposals actually returned at each budget
        sel = summary[(summary["budget"] == budget) & (summary["size"] == "all")
                      & (summary["class_name"] == "all") & (summary["metric"] == "AR")]
        if len(sel):
            values[f"proposals@{budget}"] = float(sel["num_proposals"].iloc[0])
    anchors = summary[(summary["budget"] == -1) & (summary["size"] == "all")
                      & (summary["class_name"] == "all") & (summary["metric"] == "AR")]
    values["num_anchors"] = float(anchors["num_proposals"].iloc[0]) if len(anchors) else math.nan
    return values, time.perf_counter() - start


def check_inputs(args: argparse.Namespace, info: dict[str, Any]) -> str | None:
    """Why the run cannot start (a message), or None."""
    if info["image_size"] != args.image_size:
        return (f"{args.data} was prepared at {info['image_size']} x {info['image_size']} but "
                f"--image-size is {args.image_size}; prepare it at that size (`frcnn prepare "
                f"--set data.image_size={args.image_size} ...`) or pass --image-size "
                f"{info['image_size']}")
    if args.steps < 1 or args.batch_size < 1:
        return "--steps and --batch-size must be >= 1"
    return None


def print_setup(args: argparse.Namespace, device: torch.device, command: str,
                info: dict[str, Any], class_names: list[str], split: Any,
                check: dict[str, Any]) -> None:
    """The run's device, command, data, anchors, training and the same-start check."""
    settings = model_settings(args)
    print(f"device: {device_name(device)}; torch {torch.__version__}; "
          f"date {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"command: {command}")
    print(f"data: {args.data} ({info.get('source', '?')}), {args.image_size} x "
          f"{args.image_size}, classes {', '.join(class_names)}; scored on {args.split} "
          f"({len(split)} images)")
    sizes = ", ".join(f"{s * 16:g}" for s in settings["anchors"].scales)
    print(f"anchors: sides {sizes} px x ratios {', '.join(f'{r:g}' for r in args.ratios)} at "
          f"{args.image_size} px (scales {' '.join(f'{s:g}' for s in args.scales)} at 640); "
          f"allow_border {args.allow_border:g}")
    print(f"training: {args.steps} steps x batch {args.batch_size}, SGD lr {args.lr:g} "
          f"momentum {args.momentum:g} weight decay {args.weight_decay:g}, warm-up "
          f"{args.warmup_steps} then cosine, grad clip {args.grad_clip:g}, hflip {args.hflip:g}, "
          f"seed {args.seed}")
    if args.tv_objectness_as_softmax or args.tv_head_beta is not None:
        print(f"ablation: torchvision's objectness as this detector's softmax "
              f"{args.tv_objectness_as_softmax}; torchvision's head smooth L1 beta "
              f"{args.tv_head_beta if args.tv_head_beta is not None else '1/9 (its own)'}")
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in check.items() if isinstance(v, float))
    print(f"same start: {check['tensors_copied']} tensors copied; max relative differences on "
          f"the first batch ({check['shapes']}): {diffs} (anchors in px; tolerance "
          f"{SAME_START_TOLERANCE:g}): OK", flush=True)


def score_untrained(ours: nn.Module, tv: nn.Module, split: Any, args: argparse.Namespace,
                    class_names: list[str], device: torch.device) -> dict[str, Any]:
    """Both models scored before training (they start from the same weights: close scores)."""
    untrained = {"this": score(ours, split, args, class_names, device)[0],
                 "torchvision": score(TorchvisionForEvaluation(tv, args.image_size), split,
                                      args, class_names, device)[0]}
    shown = ("AR@100", "AR@300", "AR@1000", "recall@0.5/300", "mAP@0.5")
    print("untrained: " + "; ".join(
        f"{k} {fmt(untrained['this'].get(k))} / {fmt(untrained['torchvision'].get(k))}"
        for k in shown) + " (this / torchvision)", flush=True)
    apart = {k: (v, untrained["torchvision"].get(k)) for k, v in untrained["this"].items()
             if not math.isclose(v, untrained["torchvision"].get(k, math.nan),
                                 rel_tol=0.02, abs_tol=1e-3)}
    if apart:
        print(f"WARNING: the untrained models score apart: {apart}", flush=True)
    return untrained


def train_and_score(ours: nn.Module, tv: nn.Module, batches: Any, split: Any,
                    args: argparse.Namespace, class_names: list[str], device: torch.device
                    ) -> tuple[list[Trainee], dict[str, Any]]:
    """Train both models on the same batches, then score each: ``(trainees, results)``."""
    trainees = [make_trainee("this", ours, args, device), make_trainee("torchvision", tv, args,
                                                                         device)]
    with head_smooth_l1_beta(args.tv_head_beta):
        train(trainees, batches, args, device)
    scores = {}
    for t, model in zip(trainees, (ours, TorchvisionForEvaluation(tv, args.image_size))):
        scores[t.name] = score(model, split, args, class_names, device)
        print(f"scored {t.name} on {args.split} in {scores[t.name][1]:.0f} s", flush=True)
    anchors = anchors_entry(scores["this"][0])
    tv_anchors = anchors_entry(scores["torchvision"][0])
    if any(abs(anchors[k] - tv_anchors[k]) > 1e-9 for k in anchors):
        raise RuntimeError(f"the models' anchor baselines differ: {anchors} vs {tv_anchors}")
    results: dict[str, Any] = {
        t.name: model_entry(scores[t.name][0], t, scores[t.name][1], args) for t in trainees}
    results["anchors"] = anchors
    return trainees, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/bench_quality.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    info = read_classes(args.data)
    problem = check_inputs(args, info)
    if problem:
        print(f"bench_quality: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    class_names = [str(c) for c in info["classes"]]
    train_path = args.data / "train.parquet"
    split = read_ground_truth(args.data / f"{args.split}.parquet", args.split)
    batches = training_batches(train_path, args)
    first = next(training_batches(train_path, args))  # the first batch, for the check only
    ours, tv, check = build_models(args, len(class_names), device, first["images"])
    print_setup(args, device, command, info, class_names, split, check)
    untrained = score_untrained(ours, tv, split, args, class_names, device) \
        if args.score_untrained else None
    trainees, results = train_and_score(ours, tv, batches, split, args, class_names, device)
    results["run"] = {
        "command": command, "device": device_name(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "data": str(args.data), "split": args.split,
        "num_images": len(split), "args": {k: (str(v) if isinstance(v, Path) else v)
                                           for k, v in vars(args).items()},
        "model_config": dict(ours.config), "same_start_check": check,
        "untrained_scores": untrained, "loss_history": {t.name: t.history for t in trainees},
    }
    print()
    print(table(results, class_names))
    print()
    print("anchors: best IoU over all anchors of the image (no ranking, no budget).")
    for line in verdict(results):
        print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(jsonable(results), indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
