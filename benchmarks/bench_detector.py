"""Speed of this detector next to torchvision's FasterRCNN assembled with the same parts.

Both models get the same VGG-16 ``features[:30]`` backbone (random weights), 9 anchors per cell
of sides 128 / 256 / 512 at ratios 0.5 / 1 / 2, RPN sampling 256 at 0.5 positive, NMS 0.7 with
top 12,000 -> 2,000 (train) and 6,000 -> 300 (test), minimum proposal size 16, RoI sampling 128 at
0.25 foreground, RoI align 7 x 7 (sampling ratio 2), fc6 / fc7 of 4096, score threshold 0.05,
NMS 0.3, 100 detections, the same batch, precision, optimiser and random images with random boxes.
torchvision is built with ``min_size = max_size = image_size`` so it does not resize (its
transform still normalises and copies the batch, which is part of its cost). The assembly is
:func:`benchmarks.torchvision_model.build_torchvision` with ``same_geometry=False`` (torchvision's
own anchors and transform), shared with ``bench_quality.py``.

Known differences that remain: torchvision centres anchors on the cells' corners (ours on the
cells' centres), keeps border-crossing anchors for training (ours ignores them, the spec's
rule), uses a sigmoid objectness (1 channel per anchor; ours 2-way softmax) and smooth L1 with
``beta = 1/9`` in the head (ours 1.0).

Reported: training images / s (forward + backward + SGD step), inference images / s, peak GPU
memory of each phase, the operators and host syncs of one forward (:mod:`benchmarks.op_count`:
on a GPU each operator is a kernel launch and each sync stalls the queue; the counts do not
depend on the device, except that reads of CPU tensors are not seen on the CPU), and the time
of the RPN target assignment (labelling + sampling + encoding) and of the proposal layer
(decoding + clipping + size filter + top-k + NMS + top-k) alone, on the same random inputs.

Usage::

    python benchmarks/bench_detector.py --device cuda --image-size 640 --batch-size 8 --amp bf16
    python benchmarks/bench_detector.py --device cpu --image-size 320 --batch-size 2 --steps 3
    python benchmarks/bench_detector.py --device cpu --image-size 640 --batch-size 8 --counts-only
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchvision.models.detection import FasterRCNN as TVFasterRCNN  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402

from detector import FasterRCNN  # noqa: E402
from detector.boxes import encode, pad_boxes  # noqa: E402
from benchmarks import torchvision_model  # noqa: E402
from benchmarks.op_count import OpCounter  # noqa: E402
from detector.rpn import assign_targets, proposal_layer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-size", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="bf16")
    p.add_argument("--num-classes", type=int, default=20, help="K, without background")
    p.add_argument("--max-boxes", type=int, default=10, help="random boxes per image: 1..this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--counts-only", action="store_true",
                   help="only the operator and host-sync counts (no timing): quick on a CPU at "
                        "any size")
    return p.parse_args(argv)


# -- models -----------------------------------------------------------------------------------

def build_ours(args: argparse.Namespace) -> FasterRCNN:
    return FasterRCNN(args.num_classes, image_size=args.image_size)


def build_torchvision(args: argparse.Namespace, ours: FasterRCNN) -> TVFasterRCNN:
    """torchvision's FasterRCNN with the settings of ``ours`` and its own anchor geometry and
    transform (see :mod:`benchmarks.torchvision_model`; speed does not depend on them)."""
    return torchvision_model.build_torchvision(ours, same_geometry=False)


# -- data -------------------------------------------------------------------------------------

def random_batch(args: argparse.Namespace, device: torch.device,
                 g: torch.Generator) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    s = args.image_size
    images = torch.rand(args.batch_size, 3, s, s, generator=g).to(device)
    targets = []
    for _ in range(args.batch_size):
        n = int(torch.randint(1, args.max_boxes + 1, (1,), generator=g))
        wh = (0.05 + 0.45 * torch.rand(n, 2, generator=g)) * s
        xy = torch.rand(n, 2, generator=g) * (s - wh)
        boxes = torch.cat((xy, xy + wh), dim=1)
        labels = torch.randint(1, args.num_classes + 1, (n,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


# -- timing -----------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak GPU memory (GiB) allocated while running ``fn`` once; None on the CPU."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def measure_model(model: torch.nn.Module, tv_inputs: bool, images: torch.Tensor,
                  targets: list[dict[str, torch.Tensor]], args: argparse.Namespace,
                  device: torch.device) -> dict[str, float | None]:
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    inputs = list(images) if tv_inputs else images
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    def train_step() -> None:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            losses = model(inputs, targets)
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimiser)
        scaler.update()

    def infer_step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                     enabled=amp_dtype is not None):
            model(inputs)

    def counted(train: bool) -> OpCounter:
        """Operators and host syncs of one forward (training: up to the losses)."""
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None), OpCounter() as counts:
            if train:
                model(inputs, targets)
            else:
                with torch.inference_mode():
                    model(inputs)
        return counts

    res: dict[str, float | None] = dict.fromkeys(("train", "infer", "train_mem", "infer_mem"))
    model.train()
    if not args.counts_only:
        res["train"] = args.batch_size / timed(train_step, args.steps, args.warmup, device)
        res["train_mem"] = peak_memory(train_step, device)
    train_ops = counted(True)
    model.eval()
    if not args.counts_only:
        res["infer"] = args.batch_size / timed(infer_step, args.steps, args.warmup, device)
        res["infer_mem"] = peak_memory(infer_step, device)
    infer_ops = counted(False)
    return res | {"train_ops": train_ops.total, "train_syncs": train_ops.syncs,
                  "infer_ops": infer_ops.total, "infer_syncs": infer_ops.syncs}


def measure_rpn_parts(ours: FasterRCNN, tv: TVFasterRCNN, targets: list[dict[str, torch.Tensor]],
                      args: argparse.Namespace, device: torch.device,
                      g: torch.Generator) -> dict[str, tuple[float, float]]:
    """Milliseconds per batch of target assignment and of the proposal layer, ours and
    torchvision's."""
    s, b = args.image_size, args.batch_size
    grid = (s // 16, s // 16)
    anchors = ours.rpn.anchor_generator(grid, device)
    a = anchors.shape[0]
    logits = torch.randn(b, a, 2, generator=g).to(device)
    deltas = (0.2 * torch.randn(b, a, 4, generator=g)).to(device)
    matching = dataclasses.asdict(ours.rpn.matching)
    settings = ours.rpn.proposal_settings

    def ours_targets() -> None:
        gt, valid, _ = pad_boxes([t["boxes"] for t in targets])
        labels, matched = assign_targets(anchors, gt, (s, s), gt_valid=valid, **matching)
        encode(anchors[None], gt.gather(1, matched[..., None].expand(-1, -1, 4)))

    def ours_proposals() -> None:
        proposal_layer(anchors, logits, deltas, (s, s), min_size=settings.min_size,
                       nms_iou=settings.nms_iou, pre_nms_top_n=settings.pre_nms_top_n_train,
                       post_nms_top_n=settings.post_nms_top_n_train)

    tv.rpn.train()
    image_list = ImageList(torch.zeros(b, 3, s, s, device=device), [(s, s)] * b)
    tv_anchors = tv.rpn.anchor_generator(image_list, [torch.zeros(b, 512, *grid, device=device)])
    objectness = (logits[..., 1] - logits[..., 0]).reshape(-1, 1)  # (B*A, 1) for its sigmoid
    tv_deltas = deltas.reshape(-1, 4)

    def tv_targets() -> None:
        labels, matched = tv.rpn.assign_targets_to_anchors(tv_anchors, targets)
        tv.rpn.fg_bg_sampler(labels)
        tv.rpn.box_coder.encode(matched, tv_anchors)

    def tv_proposals() -> None:
        proposals = tv.rpn.box_coder.decode(tv_deltas, tv_anchors).view(b, -1, 4)
        tv.rpn.filter_proposals(proposals, objectness, image_list.image_sizes, [a])

    steps, warmup = max(args.steps, 5), max(args.warmup, 2)
    with torch.no_grad():
        return {
            "targets": (1e3 * timed(ours_targets, steps, warmup, device),
                        1e3 * timed(tv_targets, steps, warmup, device)),
            "proposals": (1e3 * timed(ours_proposals, steps, warmup, device),
                          1e3 * timed(tv_proposals, steps, warmup, device)),
        }


# -- report -----------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None, what: str) -> str:
    """``a / b`` as ``"1.23x <what>"``; n/a without both."""
    return "n/a" if not a or not b else f"{a / b:.2f}x {what}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(args.seed)
    ours = build_ours(args).to(device)
    tv = build_torchvision(args, ours).to(device)
    images, targets = random_batch(args, device, g)

    res_ours = measure_model(ours, False, images, targets, args, device)
    res_tv = measure_model(tv, True, images, targets, args, device)
    parts = (dict.fromkeys(("targets", "proposals"), (None, None)) if args.counts_only
             else measure_rpn_parts(ours, tv, targets, args, device, g))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"device: {name}; torch {torch.__version__}; date {datetime.date.today()}")
    timing = ("operator counts only, no timing" if args.counts_only else
              f"{args.steps} timed steps after {args.warmup} warm-up (median)")
    print(f"image {args.image_size}x{args.image_size}, batch {args.batch_size}, amp {args.amp}, "
          f"{timing}")
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: python benchmarks/bench_detector.py {shown}")
    print()
    print("| metric | this detector | torchvision | this vs torchvision |")
    print("| --- | ---: | ---: | ---: |")
    for key, label in (("train", "training images / s"), ("infer", "inference images / s")):
        mine, theirs = res_ours[key], res_tv[key]
        print(f"| {label} | {fmt(mine)} | {fmt(theirs)} | {ratio(mine, theirs, 'the speed')} |")
    for key, label in (("train_mem", "peak memory, training (GiB)"),
                       ("infer_mem", "peak memory, inference (GiB)")):
        mine, theirs = res_ours[key], res_tv[key]
        print(f"| {label} | {fmt(mine)} | {fmt(theirs)} | {ratio(mine, theirs, 'the memory')} |")
    for key, label in (("train_ops", "operators, training forward"),
                       ("train_syncs", "host syncs, training forward"),
                       ("infer_ops", "operators, inference forward"),
                       ("infer_syncs", "host syncs, inference forward")):
        mine, theirs = res_ours[key], res_tv[key]
        print(f"| {label} | {mine} | {theirs} | {ratio(mine, theirs, 'as many')} |")
    for key, label in (("targets", "RPN target assignment (ms / batch)"),
                       ("proposals", "proposal layer, train top-N (ms / batch)")):
        mine, theirs = parts[key]
        speed = ratio(theirs, mine, "the speed")
        print(f"| {label} | {fmt(mine, 1)} | {fmt(theirs, 1)} | {speed} |")

if __name__ == "__main__":
    main()
