"""The training loop of one worker: a plain function, with or without Ray.

:func:`train` trains the RPN (``stage="rpn"``) or the whole Faster R-CNN (``stage="frcnn"``) on
this process's shard of a prepared table. Everything distributed is passed in: ``rank`` and
``world_size`` pick the shard, ``wrap_model`` wraps the model for DDP
(``ray.train.torch.prepare_model`` under Ray), ``report`` receives the checkpoints
(``ray.train.report`` under Ray, :class:`pipeline.checkpoints.LocalCheckpoints` alone), ``log``
receives step metrics on rank 0 (MLflow). With the defaults it runs in one process, so it can be
tested, profiled and benchmarked without Ray::

    result = train(cfg, stage="rpn", train_path="data/prepared/train.parquet", num_classes=4)

Optimisation, all from ``train.*``: SGD with momentum and weight decay; a linear warm-up over
``warmup_steps`` from ``lr * WARMUP_FACTOR`` to ``lr``, then ``cosine`` (to 0 at the last
step), ``step`` (times ``lr_gamma`` at each of ``lr_step_epochs``) or ``constant``; gradient
norm clipping; autocast in bf16 / fp16 (``amp: auto`` is bf16 on CUDA, off on CPU; fp16 uses a
gradient scaler). A checkpoint is reported at the end of every epoch, every
``checkpoint_every`` steps, and when ``max_steps`` stops the run.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from pipeline import checkpoints, data
from pipeline.config import Config
from pipeline.memory import check_memory, out_of_memory_as_error
from pipeline.modeling import model_kwargs

STAGES = ("rpn", "frcnn")
LOSS_TERMS = {"rpn": ("rpn_cls", "rpn_reg"), "frcnn": ("rpn_cls", "rpn_reg", "roi_cls", "roi_reg")}
WARMUP_FACTOR = 0.001

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class TrainResult:
    """What :func:`train` did, in this process.

    ``history`` holds one entry per epoch (the last one may be partial when ``max_steps``
    stopped the run): ``{"epoch", "steps", "loss", <loss terms>}``, means over all ranks.
    """

    model: nn.Module
    history: list[dict[str, float]]
    steps: int
    total_steps: int
    images: int
    train_seconds: float
    images_per_s: float
    resumed_from: dict[str, Any] | None = None
    final_losses: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Building blocks


def build_model(cfg: Config, *, num_classes: int, stage: str) -> nn.Module:
    """``detector.FasterRCNN`` for ``stage``, built from the config (random or ImageNet init)."""
    from detector import FasterRCNN
    return FasterRCNN(num_classes, rpn_only=(stage == "rpn"), **model_kwargs(cfg))


def init_from_rpn(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Copy the backbone and RPN weights of the RPN stage's model file into ``model``.

    Returns:
        ``{"loaded": n, "new": m}``: tensors copied, tensors left at their initialisation
        (the Fast R-CNN head).

    Raises:
        FileNotFoundError: no model file (run ``frcnn train --stage rpn`` first).
        ValueError: a tensor's shape differs (the RPN was built with other anchors / sizes).
    """
    from detector.serialization import load_model
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: RPN model not found; run `frcnn train --stage rpn` first")
    rpn, _ = load_model(path, map_location="cpu")
    source = rpn.state_dict()
    target = model.state_dict()
    mismatched = [f"{k}: {tuple(v.shape)} in {path} vs {tuple(target[k].shape)}"
                  for k, v in source.items() if k in target and v.shape != target[k].shape]
    if mismatched:
        raise ValueError(f"{path}: weights do not fit the configured model (different anchors, "
                         f"image size or classes?): {'; '.join(mismatched[:5])}")
    unknown = sorted(set(source) - set(target))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} tensors have no place in the model, e.g. "
                         f"{unknown[:3]}")
    model.load_state_dict(source, strict=False)
    return {"loaded": len(source), "new": len(set(target) - set(source))}


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> the autocast dtype, or None for full precision."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[setting]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str,
              milestones: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """Multiplier of ``train.lr`` for optimiser step ``step`` (0-based).

    Warm-up: linear from :data:`WARMUP_FACTOR` to 1 over ``warmup_steps``; then ``constant``,
    ``step`` (``gamma`` per milestone passed, milestones in steps) or ``cosine`` (from 1 at the
    end of the warm-up to 0 at ``total_steps``).
    """
    warm = 1.0
    if step < warmup_steps:
        warm = WARMUP_FACTOR + (1.0 - WARMUP_FACTOR) * step / warmup_steps
    if schedule == "constant":
        return warm
    if schedule == "step":
        return warm * gamma ** sum(step >= m for m in milestones)
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, (step - warmup_steps) / span))
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.lr_schedule: unknown schedule {schedule!r}")


def _epochs(cfg: Config, stage: str) -> int:
    return cfg.train.rpn_epochs if stage == "rpn" else cfg.train.frcnn_epochs


def _mean_over_ranks(sums: torch.Tensor, count: int) -> torch.Tensor:
    """Mean of per-rank sums over ``count`` steps each; all-reduced when distributed."""
    total = sums.clone()
    ranks = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        ranks = torch.distributed.get_world_size()
    return total / max(1, count * ranks)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    """Images to ``device``; the targets stay on the CPU: the model checks and pads them there
    and moves the padded batch in one go (no host sync on the GPU for the check)."""
    return batch["images"].to(device, non_blocking=True), batch["targets"]


def _print(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, *, stage: str, train_path: str | Path, num_classes: int,
          init_model: str | Path | None = None,
          resume: str | Path | None = None,
          rank: int = 0, world_size: int = 1,
          device: torch.device | str | None = None,
          wrap_model: Callable[[nn.Module], nn.Module] | None = None,
          report: checkpoints.ReportFn | None = None,
          log: LogFn | None = None,
          model_meta: Mapping[str, Any] | None = None,
          model_fn: Callable[[], nn.Module] | None = None,
          say: Callable[[str], None] = _print,
          on_epoch_end: Callable[[nn.Module, int], dict[str, float]] | None = None
          ) -> TrainResult:
    """Train one stage on this rank's shard; see the module docstring.

    Args:
        cfg: the resolved config (``train.*`` and the model sections are read).
        stage: ``"rpn"`` or ``"frcnn"``.
        train_path: the prepared training table.
        num_classes: K, classes without background.
        init_model: an RPN model file to start from (the ``frcnn`` stage); ignored on resume.
        resume: a checkpoint folder to continue from (model, optimiser, schedule, counters, RNG).
        rank, world_size: this process's place in the worker group.
        device: default CPU.
        wrap_model: e.g. DDP; applied after the weights are loaded and the model is on
            ``device``.
        report: receives every checkpoint (see :data:`pipeline.checkpoints.ReportFn`); None:
            checkpoints are not written.
        log: ``log(metrics, step)`` on rank 0 for step metrics (loss terms, ``loss``, ``lr``,
            ``images_per_s``, ``gpu_mem_gb``) and, at step = epoch, ``epoch/*`` means.
        model_meta: stored with the final model (e.g. the class names).
        model_fn: builds the model instead of :func:`build_model` (tests, benchmarks).
        say: progress lines (rank 0 only).
        on_epoch_end: ``on_epoch_end(model, epochs_done)`` on rank 0 after each epoch (e.g.
            validation recall of a sweep trial); it gets the unwrapped model and may switch it
            to eval mode (training mode is restored after it). The metrics it returns are
            added to that epoch's ``log`` (as ``epoch/<name>``) and to its checkpoint report.

    Raises:
        FloatingPointError: a loss is NaN or infinite (names the step and the loss terms).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    tcfg = cfg.train
    device = torch.device(device or "cpu")
    lead = rank == 0
    name = f"train_{stage}"

    dataset = data.DetectionDataset(train_path, hflip=tcfg.hflip, seed=tcfg.seed,
                                    use_difficult=tcfg.use_difficult)
    sampler = data.ShardSampler(len(dataset), rank=rank, world_size=world_size, shuffle=True,
                                seed=tcfg.seed)
    loader = data.make_loader(dataset, sampler, batch_size=tcfg.batch_size,
                              num_workers=tcfg.loader_workers,
                              pin_memory=device.type == "cuda")
    steps_per_epoch = math.ceil(sampler.shard_size / tcfg.batch_size)
    # a batch larger than the shard is one smaller step per epoch, never zero steps
    images_per_step = min(tcfg.batch_size, sampler.shard_size)
    image_size = int(dataset[0][0].shape[-1])
    check_memory(batch_size=tcfg.batch_size, images_per_step=images_per_step,
                 image_size=image_size, device=device)
    epochs = _epochs(cfg, stage)
    total_steps = epochs * steps_per_epoch
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps)

    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = model_fn() if model_fn is not None else build_model(cfg, num_classes=num_classes,
                                                                stage=stage)
    state = checkpoints.read_state(resume) if resume is not None else None
    resumed_from = None
    if state is not None:
        model.load_state_dict(state["model"])
        resumed_from = {"path": str(resume), "epoch": state["epoch"], "step": state["step"]}
        if lead:
            say(f"{name}: resuming from checkpoint {resume} (epoch {state['epoch']}, "
                f"step {state['step']})")
    elif init_model is not None:
        counts = init_from_rpn(model, init_model)
        if lead:
            say(f"{name}: initialised {counts['loaded']} tensors from {init_model} "
                f"({counts['new']} left at their initialisation)")
    if stage == "rpn" and hasattr(model, "roi_heads"):
        # The RPN stage trains backbone + RPN; the Fast R-CNN head gets no gradients. Freezing
        # it keeps it out of the optimiser and out of DDP's gradient all-reduce.
        model.roi_heads.requires_grad_(False)
    model.to(device)
    net = wrap_model(model) if wrap_model is not None else model
    params = [p for p in model.parameters() if p.requires_grad]

    optimizer = torch.optim.SGD(params, lr=tcfg.lr, momentum=tcfg.momentum,
                                weight_decay=tcfg.weight_decay)
    milestones = tuple(e * steps_per_epoch for e in tcfg.lr_step_epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, warmup_steps=tcfg.warmup_steps, total_steps=total_steps, schedule=tcfg.lr_schedule,
        milestones=milestones, gamma=tcfg.lr_gamma))
    dtype = amp_dtype(tcfg.amp, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    terms = LOSS_TERMS[stage]
    step, epoch, epoch_step = 0, 0, 0
    epoch_sums = torch.zeros(len(terms), dtype=torch.float64)
    history: list[dict[str, float]] = []
    if state is not None:
        step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
        epoch_sums = state["epoch_sums"].to(torch.float64)
        history = [dict(h) for h in state["history"]]
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        checkpoints.set_rng_state(state["rng"])
    else:
        torch.manual_seed(tcfg.seed + 1000 * rank)  # per-rank sampling of anchors and RoIs
    start_step = step

    def epoch_entry(done_steps: int) -> dict[str, float]:
        means = _mean_over_ranks(epoch_sums, done_steps)
        entry = {"epoch": epoch, "steps": done_steps, "loss": float(means.sum())}
        entry.update({t: float(m) for t, m in zip(terms, means)})
        return entry

    def checkpoint(metrics: dict[str, float], *, final: bool) -> None:
        if report is None:
            return
        seconds = time.perf_counter() - t_start
        metrics = dict(metrics, images=images_seen, train_seconds=seconds,
                       images_per_s=images_seen / seconds if images_seen else 0.0)
        ckpt_name = checkpoints.checkpoint_name(epoch, step)
        if not lead:
            report(metrics, None, ckpt_name)
            return
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-ckpt-"))
        try:
            checkpoints.write(folder, {
                "model": model.state_dict(),
                # a finished run needs no optimiser state: smaller last checkpoint
                "optimizer": None if final else optimizer.state_dict(),
                "scheduler": None if final else scheduler.state_dict(),
                "scaler": None if (final or scaler is None) else scaler.state_dict(),
                "step": step, "epoch": epoch, "epoch_step": epoch_step,
                "epoch_sums": epoch_sums.clone(), "history": history,
                "rng": checkpoints.rng_state(),
            }, {"stage": stage, "epoch": epoch, "epoch_step": epoch_step, "step": step,
                "total_steps": total_steps, "done": final, "history": history})
            if final:
                from detector.serialization import save_model
                save_model(folder / checkpoints.MODEL, model, stage=stage, steps=step,
                           **dict(model_meta or {}))
            report(metrics, folder, ckpt_name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    net.train()
    images_seen = 0
    t_start = time.perf_counter()
    last: dict[str, float] = {}
    while step < total_steps and epoch < epochs:
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, start=epoch_step * tcfg.batch_size)
        t_prev = time.perf_counter()
        for batch in loader:
            images, targets = _to_device(batch, device)
            oom = out_of_memory_as_error(batch_size=tcfg.batch_size, images=images.shape[0],
                                         image_size=image_size, device=device, step=step + 1)
            with oom, torch.autocast(device.type, dtype=dtype or torch.float32,
                                     enabled=dtype is not None):
                losses = net(images, targets)
            loss = sum(losses[t] for t in terms)
            # The step's one host sync of the loop: its loss terms, for the check and the log.
            values = torch.stack([losses[t].detach().float() for t in terms]).cpu()
            if not torch.isfinite(values).all():
                shown = {k: float(v.detach()) for k, v in losses.items()}
                raise FloatingPointError(f"{name}: non-finite loss at step {step + 1} "
                                         f"(epoch {epoch + 1}): {shown}")
            optimizer.zero_grad(set_to_none=True)
            with out_of_memory_as_error(batch_size=tcfg.batch_size, images=images.shape[0],
                                        image_size=image_size, device=device, step=step + 1):
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            epoch_step += 1
            epoch_sums += values.to(torch.float64)
            now = time.perf_counter()
            batch_images = images.shape[0] * world_size
            images_seen += batch_images
            last = {t: float(v) for t, v in zip(terms, values)}
            last["loss"] = float(values.sum())
            if lead and (step % tcfg.log_every == 0 or step == total_steps):
                metrics = dict(last, lr=lr, images_per_s=batch_images / max(now - t_prev, 1e-9))
                if device.type == "cuda":
                    metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if log is not None:
                    log(metrics, step)
                say(f"{name}: epoch {epoch + 1}/{epochs} step {step}/{total_steps} "
                    f"loss {metrics['loss']:.4f} lr {lr:.2e} {metrics['images_per_s']:.2f} img/s")
            t_prev = now
            if step >= total_steps:
                break
            if (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0
                    and epoch_step < steps_per_epoch):
                checkpoint(dict(last, step=step, epoch=epoch), final=False)
        if epoch_step >= steps_per_epoch or step >= total_steps:
            entry = epoch_entry(epoch_step)
            history.append(entry)
            extra: dict[str, float] = {}
            if lead and on_epoch_end is not None:
                extra = dict(on_epoch_end(model, epoch + 1))
                net.train()
            if lead and log is not None:
                log({f"epoch/{k}": v for k, v in (entry | extra).items()
                     if k not in ("epoch", "steps")}, epoch + 1)
            epoch += 1
            epoch_step = 0
            epoch_sums.zero_()
            checkpoint(dict(last, **extra, step=step, epoch=epoch),
                       final=step >= total_steps or epoch >= epochs)
    if step == start_step and report is not None:
        # resumed from a finished run's last checkpoint: report it again so the caller gets
        # the final model
        checkpoint(dict(step=step, epoch=epoch), final=True)
    seconds = time.perf_counter() - t_start
    return TrainResult(model=model, history=history, steps=step, total_steps=total_steps,
                       images=images_seen, train_seconds=seconds,
                       images_per_s=images_seen / seconds if images_seen else 0.0,
                       resumed_from=resumed_from, final_losses=last)
