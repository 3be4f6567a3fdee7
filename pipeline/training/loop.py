"""The training loop of one worker: a plain function, with or without Ray.

:func:`train` trains the RPN (``stage="rpn"``) or the whole Faster R-CNN (``stage="frcnn"``) on
this process's shard of a prepared table. Everything distributed is passed in: ``rank`` and
``world_size`` pick the shard, ``wrap_model`` wraps the model for DDP
(``ray.train.torch.prepare_model`` under Ray), ``report`` receives the checkpoints
(``ray.train.report`` under Ray, :class:`pipeline.training.checkpoints.LocalCheckpoints` alone),
``log`` receives step metrics on rank 0 (MLflow). With the defaults it runs in one process, so
it can be tested, profiled and benchmarked without Ray::

    result = train(cfg, stage="rpn", train_path="data/prepared/train.parquet", num_classes=4)

The loop is a few named steps (:func:`_train_step`, :func:`_end_epoch`, :func:`_checkpoint`)
over one :class:`LoopState`, which saves and restores itself; optimisation settings are
:mod:`pipeline.training.schedule`'s. A checkpoint is reported at the end of every epoch, every
``train.checkpoint_every`` steps, and when ``train.max_steps`` stops the run. Each step reads its
loss terms back once (the one host sync of the loop), for the log and for the check that they
are finite: a NaN or infinite loss raises :class:`detector.NonFiniteLossError` naming the step,
the epoch and the terms.
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

from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.modeling import build_model, init_from_rpn
from pipeline.training import checkpoints
from pipeline.training.loader import TableInput
from pipeline.training.memory import check_memory, out_of_memory_as_error
from pipeline.training.schedule import make_optimizer
from pipeline.training.state import LoopState, TrainResult

STAGES = ("rpn", "frcnn")
LOSS_TERMS = {"rpn": ("rpn_cls", "rpn_reg"), "frcnn": ("rpn_cls", "rpn_reg", "roi_cls", "roi_reg")}

LogFn = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class _Run:
    """What stays fixed while a run trains: the model and its optimiser, the plan, the hooks."""

    cfg: Config
    stage: str
    model: nn.Module
    net: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    dtype: torch.dtype | None
    device: torch.device
    image_size: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    world_size: int
    lead: bool
    report: checkpoints.ReportFn | None
    log: LogFn | None
    say: Callable[[str], None]
    on_epoch_end: Callable[[nn.Module, int], dict[str, float]] | None
    model_meta: Mapping[str, Any]
    write_checkpoints: bool
    started: float = field(default_factory=time.perf_counter)

    @property
    def name(self) -> str:
        return f"train_{self.stage}"

    def state_dict(self, loop: LoopState, *, final: bool) -> dict[str, Any]:
        """Everything a checkpoint restores; a finished run keeps no optimiser state."""
        keep = not final
        return {"model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict() if keep else None,
                "scheduler": self.scheduler.state_dict() if keep else None,
                "scaler": self.scaler.state_dict() if keep and self.scaler else None,
                "rng": checkpoints.rng_state(), **loop.state_dict()}

    def load_state_dict(self, saved: Mapping[str, Any], loop: LoopState) -> None:
        loop.load_state_dict(saved)
        if saved["optimizer"] is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])
        checkpoints.set_rng_state(saved["rng"])


def _print(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, *, stage: str, train_path: str | Path | None = None, num_classes: int,
          data: Any = None,
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
          on_epoch_end: Callable[[nn.Module, int], dict[str, float]] | None = None,
          write_checkpoints: bool = True) -> TrainResult:
    """Train one stage on this rank's shard; see the module docstring.

    Args:
        cfg: the resolved config (``train.*`` and the model sections are read).
        stage: ``"rpn"`` or ``"frcnn"``.
        train_path: the prepared training table, read by the plain reader
            (:class:`pipeline.training.loader.TableInput`), unless ``data`` is given.
        num_classes: K, classes without background.
        data: this rank's input instead (the interface of ``TableInput``: ``shard_size``,
            ``image_size``, ``epoch(epoch, start_step)``; Ray Data's:
            :class:`pipeline.training.ray_input.ShardInput`).
        init_model: an RPN model file to start from (the ``frcnn`` stage); ignored on resume.
        resume: a checkpoint folder to continue from (model, optimiser, schedule, counters, RNG).
        rank, world_size: this process's place in the worker group.
        device: default CPU.
        wrap_model: e.g. DDP; applied after the weights are loaded and the model is on
            ``device``.
        report: receives every checkpoint and owns its folder from then on (see
            :data:`pipeline.training.checkpoints.ReportFn`); None: checkpoints are not written.
        write_checkpoints: False: ``report`` gets the metrics of each checkpoint but no folder
            (a sweep trial, which nothing resumes, reports without writing ~1 GB a time).
        log: ``log(metrics, step)`` on rank 0 for step metrics (loss terms, ``loss``, ``lr``,
            ``images_per_s``, ``gpu_mem_gb``) and, at step = epoch, ``epoch/*`` means.
        model_meta: stored with the final model (e.g. the class names).
        model_fn: builds the model instead of :func:`pipeline.modeling.build_model`.
        say: progress lines (rank 0 only).
        on_epoch_end: ``on_epoch_end(model, epochs_done)`` on rank 0 after each epoch (e.g.
            validation recall of a sweep trial); it gets the unwrapped model and may switch it
            to eval mode (training mode is restored after it). The metrics it returns are
            added to that epoch's ``log`` (as ``epoch/<name>``) and to its checkpoint report.

    Raises:
        detector.NonFiniteLossError: a loss is NaN or infinite (names step, epoch and terms).
        pipeline.errors.InsufficientMemoryError: a step cannot fit in memory.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    device = torch.device(device or "cpu")
    data = _data(cfg, data or train_path, rank, world_size, device)
    saved = checkpoints.read_state(resume) if resume is not None else None
    run = _setup(cfg, stage, num_classes, device=device, rank=rank, world_size=world_size,
                 image_size=data.image_size, shard_size=data.shard_size, saved=saved,
                 init_model=init_model, model_fn=model_fn, wrap_model=wrap_model,
                 hooks=dict(report=report, log=log, say=say, on_epoch_end=on_epoch_end,
                            model_meta=dict(model_meta or {}),
                            write_checkpoints=write_checkpoints))
    loop = LoopState(LOSS_TERMS[stage])
    resumed_from = _restore(run, loop, saved, resume, cfg.train.seed + 1000 * rank)
    start_step = loop.step
    run.net.train()
    while loop.step < run.total_steps and loop.epoch < run.epochs:
        _run_epoch(run, loop, data.epoch(loop.epoch, loop.epoch_step))
    if loop.step == start_step and report is not None:
        # resumed from a finished run's last checkpoint: report it again so the caller gets
        # the final model
        _checkpoint(run, loop, {"step": loop.step, "epoch": loop.epoch}, final=True)
    seconds = time.perf_counter() - run.started
    return TrainResult(model=run.model, history=loop.history, steps=loop.step,
                       total_steps=run.total_steps, images=loop.images, train_seconds=seconds,
                       images_per_s=loop.images / seconds if loop.images else 0.0,
                       resumed_from=resumed_from, final_losses=loop.last)


def _restore(run: Any, loop: LoopState, saved: Mapping[str, Any] | None,
             resume: str | Path | None, seed: int) -> dict[str, Any] | None:
    """Continue from the checkpoint ``saved`` (read from ``resume``) and say so; without one,
    seed this rank's sampling of anchors and RoIs. Returns where it resumed from, or None."""
    if saved is None:
        torch.manual_seed(seed)
        return None
    run.load_state_dict(saved, loop)
    if run.lead:
        run.say(f"{run.name}: resuming from checkpoint {resume} (epoch {loop.epoch}, "
                f"step {loop.step})")
    return {"path": str(resume), "epoch": loop.epoch, "step": loop.step}


# --------------------------------------------------------------------------------------------
# Setting up


def _data(cfg: Config, source: Any, rank: int, world_size: int, device: torch.device) -> Any:
    """The shard's input (``source``: an input object, or a prepared table's path for the plain
    reader); a batch that cannot fit in memory is refused here, before the model is built."""
    tcfg = cfg.train
    data = source
    if isinstance(source, (str, Path)):
        data = TableInput(source, rank=rank, world_size=world_size,
                          batch_size=tcfg.batch_size, seed=tcfg.seed, hflip=tcfg.hflip,
                          use_difficult=tcfg.use_difficult, num_workers=tcfg.loader_workers,
                          pin_memory=device.type == "cuda")
    # a batch larger than the shard is one smaller step per epoch, never zero steps
    check_memory(batch_size=tcfg.batch_size, images_per_step=min(tcfg.batch_size,
                                                                 data.shard_size),
                 image_size=data.image_size, device=device)
    return data


def _setup(cfg: Config, stage: str, num_classes: int, *, device: torch.device, rank: int,
           world_size: int, image_size: int, shard_size: int, saved: Mapping[str, Any] | None,
           init_model: str | Path | None, model_fn: Callable[[], nn.Module] | None,
           wrap_model: Callable[[nn.Module], nn.Module] | None, hooks: dict[str, Any]) -> _Run:
    """Build the model (seeded alike on every rank; weights from ``saved`` or ``init_model``),
    wrap it, and make its optimiser for the planned number of steps."""
    tcfg = cfg.train
    lead = rank == 0
    steps_per_epoch = math.ceil(shard_size / tcfg.batch_size)
    epochs = tcfg.rpn_epochs if stage == "rpn" else tcfg.frcnn_epochs
    total_steps = epochs * steps_per_epoch
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps)
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = model_fn() if model_fn is not None else build_model(cfg, num_classes=num_classes,
                                                                stage=stage)
    if saved is not None:
        model.load_state_dict(saved["model"])
    elif init_model is not None:
        counts = init_from_rpn(model, init_model)
        if lead:
            hooks["say"](f"train_{stage}: initialised the backbone and RPN ({counts['loaded']} "
                         f"tensors) from {init_model}; the Fast R-CNN head ({counts['new']} "
                         f"tensors) starts from its initialisation")
    if stage == "rpn" and hasattr(model, "roi_heads"):
        # The RPN stage trains backbone + RPN; the Fast R-CNN head gets no gradients. Freezing
        # it keeps it out of the optimiser and out of DDP's gradient all-reduce.
        model.roi_heads.requires_grad_(False)
    model.to(device)
    net = wrap_model(model) if wrap_model is not None else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler, scaler, dtype = make_optimizer(
        tcfg, params, steps_per_epoch=steps_per_epoch, total_steps=total_steps, device=device)
    return _Run(cfg=cfg, stage=stage, model=model, net=net, params=params, optimizer=optimizer,
                scheduler=scheduler, scaler=scaler, dtype=dtype, device=device,
                image_size=image_size, steps_per_epoch=steps_per_epoch, epochs=epochs,
                total_steps=total_steps, world_size=world_size, lead=lead, **hooks)


# --------------------------------------------------------------------------------------------
# The steps


def _run_epoch(run: _Run, loop: LoopState, loader: Any) -> None:
    """The rest of the current epoch (from ``loop.epoch_step``), then its end when reached."""
    every = run.cfg.train.checkpoint_every
    t_prev = time.perf_counter()
    for batch in loader:
        _train_step(run, loop, batch, t_prev)
        t_prev = time.perf_counter()
        if loop.step >= run.total_steps:
            break
        if every and loop.step % every == 0 and loop.epoch_step < run.steps_per_epoch:
            _checkpoint(run, loop, dict(loop.last, step=loop.step, epoch=loop.epoch), final=False)
    if loop.epoch_step >= run.steps_per_epoch or loop.step >= run.total_steps:
        _end_epoch(run, loop)
    else:  # an input that ends early would otherwise start the same epoch again, forever
        raise DataError(f"{run.name}: the input of epoch {loop.epoch + 1} ended after "
                        f"{loop.epoch_step} of its {run.steps_per_epoch} steps")


def _train_step(run: _Run, loop: LoopState, batch: Mapping[str, Any], t_prev: float) -> None:
    """Forward, check, backward, optimiser and schedule step; counts and logs the step."""
    # Images to the device; the targets stay on the CPU: the model checks and pads them there
    # and moves the padded batch in one go (no host sync on the GPU for the check).
    images, targets = batch["images"].to(run.device, non_blocking=True), batch["targets"]
    tcfg = run.cfg.train
    oom = dict(batch_size=tcfg.batch_size, images=images.shape[0], image_size=run.image_size,
               device=run.device, step=loop.step + 1)
    with out_of_memory_as_error(**oom), torch.autocast(
            run.device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
        losses = run.net(images, targets)
    terms = loop.terms
    loss = sum(losses[t] for t in terms)
    # The step's one host sync: its loss terms, for the check and the log.
    values = torch.stack([losses[t].detach().float() for t in terms]).cpu()
    if not torch.isfinite(values).all():
        from detector import NonFiniteLossError
        shown = {t: float(v) for t, v in zip(terms, values)}
        raise NonFiniteLossError(f"{run.name}: non-finite loss at step {loop.step + 1} "
                                 f"(epoch {loop.epoch + 1}): {shown}")
    run.optimizer.zero_grad(set_to_none=True)
    with out_of_memory_as_error(**oom):
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(run.optimizer)
        else:
            loss.backward()
    if tcfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.params, tcfg.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    batch_images = images.shape[0] * run.world_size
    loop.add_step(values, batch_images)
    if run.lead and (loop.step % tcfg.log_every == 0 or loop.step == run.total_steps):
        _log_step(run, loop, lr, batch_images / max(time.perf_counter() - t_prev, 1e-9))


def _log_step(run: _Run, loop: LoopState, lr: float, images_per_s: float) -> None:
    metrics = dict(loop.last, lr=lr, images_per_s=images_per_s)
    if run.device.type == "cuda":
        metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    if run.log is not None:
        run.log(metrics, loop.step)
    run.say(f"{run.name}: epoch {loop.epoch + 1}/{run.epochs} step {loop.step}/{run.total_steps} "
            f"loss {metrics['loss']:.4f} lr {lr:.2e} {images_per_s:.2f} img/s")


def _end_epoch(run: _Run, loop: LoopState) -> None:
    """Close the epoch (means over ranks), run the epoch hook, log, and checkpoint."""
    entry = loop.close_epoch()
    extra: dict[str, float] = {}
    if run.lead and run.on_epoch_end is not None:
        extra = dict(run.on_epoch_end(run.model, loop.epoch))
        run.net.train()
    if run.lead and run.log is not None:
        run.log({f"epoch/{k}": v for k, v in (entry | extra).items()
                 if k not in ("epoch", "steps")}, loop.epoch)
    _checkpoint(run, loop, dict(loop.last, **extra, step=loop.step, epoch=loop.epoch),
                final=loop.step >= run.total_steps or loop.epoch >= run.epochs)


def _checkpoint(run: _Run, loop: LoopState, metrics: dict[str, float], *, final: bool) -> None:
    """Report a checkpoint (every rank reports; rank 0 writes the folder); the final one also
    holds the model file."""
    if run.report is None:
        return
    seconds = time.perf_counter() - run.started
    metrics = dict(metrics, images=loop.images, train_seconds=seconds,
                   images_per_s=loop.images / seconds if loop.images else 0.0)
    name = checkpoints.checkpoint_name(loop.epoch, loop.step)
    if not run.lead or not run.write_checkpoints:
        run.report(metrics, None, name)
        return
    folder = Path(tempfile.mkdtemp(prefix=f"{run.name}-ckpt-"))
    try:
        checkpoints.write(folder, run.state_dict(loop, final=final), {
            "stage": run.stage, "epoch": loop.epoch, "epoch_step": loop.epoch_step,
            "step": loop.step, "total_steps": run.total_steps, "done": final,
            "history": loop.history})
        if final:
            from detector.serialization import save_model
            save_model(folder / checkpoints.MODEL, run.model, stage=run.stage, steps=loop.step,
                       **run.model_meta)
        run.report(metrics, folder, name)  # the folder is the report's now (it deletes it)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
