"""The report of ``benchmarks/bench_quality.py``: its entries, table, verdict and JSON."""

from __future__ import annotations

import argparse
import math
import platform
from typing import Any

import torch

#: "Clearly above the anchors": AR@300 at least this much (absolute) above the anchor-only AR.
CLEAR_MARGIN = 0.02
BUDGETS = (100, 300, 1000)
LOSS_TERMS = ("rpn_cls", "rpn_reg", "roi_cls", "roi_reg")


def model_entry(values: dict[str, float], trainee: Any, eval_seconds: float,
                args: argparse.Namespace) -> dict[str, Any]:
    entry = {k: v for k, v in values.items() if not k.startswith("anchors/")
             and k != "num_anchors"}
    last = trainee.history[-min(20, len(trainee.history)):]
    entry |= {
        "train_seconds": round(trainee.seconds, 2),
        "train_images_per_s": round(args.steps * args.batch_size / trainee.seconds, 4),
        "eval_seconds": round(eval_seconds, 2),
        "final_losses": {k: round(sum(h[k] for h in last) / len(last), 5)
                         for k in (*LOSS_TERMS, "loss")},
    }
    return entry


def anchors_entry(values: dict[str, float]) -> dict[str, float]:
    return {"AR": values.get("anchors/AR", math.nan),
            "recall@0.5": values.get("anchors/recall@0.5", math.nan),
            "recall@0.7": values.get("anchors/recall@0.7", math.nan),
            "num_anchors": values["num_anchors"]}


# -- report -----------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(results: dict[str, Any], class_names: list[str]) -> str:
    """Markdown table: rows metrics, columns this detector, torchvision, anchors."""
    this, tv, anchors = results["this"], results["torchvision"], results["anchors"]
    rows = [(f"AR@{b}", f"AR@{b}", "AR") for b in BUDGETS]
    rows += [("recall@0.5/300", "recall@0.5/300", "recall@0.5"),
             ("recall@0.7/300", "recall@0.7/300", "recall@0.7"),
             ("mAP@0.5", "mAP@0.5", None)]
    rows += [(f"AP@0.5 {c}", f"AP@0.5/{c}", None) for c in class_names]
    rows += [(f"proposals returned at {b} (mean)", f"proposals@{b}", "num_anchors")
             for b in BUDGETS]
    lines = ["| metric | this detector | torchvision | anchors |", "| --- | ---: | ---: | ---: |"]
    for label, key, anchor_key in rows:
        digits = 1 if key.startswith("proposals@") else 4
        anchor = fmt(anchors.get(anchor_key), digits) if anchor_key else ""
        lines.append(f"| {label} | {fmt(this.get(key), digits)} | {fmt(tv.get(key), digits)} "
                     f"| {anchor} |")
    lines.append(f"| training seconds | {fmt(this['train_seconds'], 0)} | "
                 f"{fmt(tv['train_seconds'], 0)} | |")
    lines.append(f"| training images / s | {fmt(this['train_images_per_s'], 3)} | "
                 f"{fmt(tv['train_images_per_s'], 3)} | |")
    lines.append(f"| loss, mean of the last 20 steps | {fmt(this['final_losses']['loss'], 3)} | "
                 f"{fmt(tv['final_losses']['loss'], 3)} | |")
    return "\n".join(lines)


def verdict(results: dict[str, Any]) -> list[str]:
    """The issue's targets, one line each."""
    this, tv, anchors = results["this"], results["torchvision"], results["anchors"]
    out = []
    for name, entry in (("this detector", this), ("torchvision", tv)):
        ar, base = entry.get("AR@300", math.nan), anchors["AR"]
        judged = ("clearly above: learned" if ar >= base + CLEAR_MARGIN else
                  "above, not clearly" if ar > base else "NOT above the anchors")
        out.append(f"{name}: AR@300 {fmt(ar)} vs anchor-only AR {fmt(base)} ({ar - base:+.4f}) "
                   f"-> {judged}")
    for key in ("AR@300", "mAP@0.5"):
        a, b = this.get(key, math.nan), tv.get(key, math.nan)
        out.append(f"{key}: this {fmt(a)} vs torchvision {fmt(b)} -> "
                   f"{'at least equal' if a >= b else 'torchvision higher'} "
                   f"({a - b:+.4f})")
    a, b = this["train_seconds"], tv["train_seconds"]
    out.append(f"training time: this {a:.0f} s vs torchvision {b:.0f} s -> "
               f"{'no more' if a <= b else 'more'} ({a / b:.2f}x)")
    return out


def jsonable(value: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# -- main -------------------------------------------------------------------------------------
