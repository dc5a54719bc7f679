"""The training loop, on Accelerate: `train(cfg)` = `setup` → `fit` → `finish`, the one loop that
`recipes/lora_sentiment.py`, `recipes/lora_retrieval.py` and `mmpeft train` run.

What is learnt (model, loss, evaluation, report) belongs to the task object (`tasks.py`); the loop never asks which
task it runs. `train.evaluate_only=true` skips `fit` and evaluates the model as built (e.g. zero-shot CLIP).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..backbones import load_backbone
from ..config import Config
from ..data.loaders import build_dataloaders
from ..errors import TrainingError
from ..models.adapters import format_trainable, trainable_report
from ..models.precision import fit_backbone_to_precision, keep_trainable_fp32
from ..models.saving import save_adapter
from .caching import caches_for, describe_caches, plan_feature_caches, stop_decoding_cached_images
from .checkpoints import (
    LoopState,
    check_same_settings,
    load_state_checked,
    resolve_resume,
    resume_settings,
    save_checkpoint,
    save_trainable_only,
    verify_checkpoint,
)
from .faults import (
    NonFiniteSkip,
    outlive_launcher,
    resume_command,
    stop_on_interrupt,
)
from .optim import EarlyStopping, build_optimizer, peak_memory_gib, resolve_mixed_precision, trainable_state
from .run_folder import prepare_output_dir, write_metrics
from .step import check_skipped, train_step
from .summary import run_summary
from .tasks import Task, get_task
from .trackers import flat_config, resolve_tracker, tracker_init_kwargs

logger = logging.getLogger("mmpeft")
BEST_WEIGHTS = "best_trainable.safetensors"
# What writing weights raises when the disk is full or the folder unwritable (torch.save: "unexpected pos ...").
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


@dataclass
class Run:
    """Everything a run holds between `setup`, `fit` and `finish`."""

    cfg: Config
    out: Path
    accelerator: object
    task: Task
    backbone: object
    data: object
    model: nn.Module
    loaders: dict
    parameters: dict
    state: LoopState
    stopper: EarlyStopping
    optimizer: object = None
    scheduler: object = None
    total_steps: int = 0
    steps_per_epoch: int = 0
    best_state: dict | None = None
    before_training: dict = field(default_factory=dict)
    stop_reason: str | None = None
    window_finite: bool = False  # whether the current accumulation window has a finite loss yet
    nonfinite: NonFiniteSkip | None = None  # set: non-finite steps are skipped on the device, read at log points
    feature_caches: dict = field(default_factory=dict)  # {split: {tower: FeatureCache}} (caching.py)
    cache_report: dict = field(default_factory=dict)  # {tower: cached where, or why not}
    step_seconds: list = field(default_factory=list)  # wall time of each optimizer step of this process, data included
    step_samples: list = field(default_factory=list)
    precision: dict = field(default_factory=dict)  # what the mixed precision chose for weights and attention


def train(cfg: Config) -> dict:
    """Fine-tune, evaluate and save; returns the final metrics (also written to `<output_dir>/metrics.json`)."""
    try:
        run = setup(cfg)
        if cfg.train.evaluate_only:
            run.stop_reason = "evaluate_only"
        else:
            fit(run)
        return finish(run)
    finally:
        _release_accelerator_state()


def setup(cfg: Config) -> Run:
    """Output folder, accelerator, backbone, data, model (through the task), optimizer and resumed state."""
    from accelerate.utils import set_seed

    tracker = resolve_tracker(cfg.train.tracker)  # a tracker that is not installed fails before anything is touched
    out, removed = prepare_output_dir(cfg.train.output_dir, overwrite=cfg.train.overwrite,
                                      resume=bool(cfg.train.resume_from), project=cfg.train.project)
    task = get_task(cfg)
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # The process group first (as `Accelerator` starts it: `ACCELERATE_USE_CPU` puts several ranks on the CPU), the
    # Accelerator once the model exists: `auto` precision is chosen from its layers.
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if removed:
        processes.print(removed)
    set_seed(cfg.train.seed)
    with processes.main_process_first():  # one process builds caches (embedded backbone and data) first
        backbone = load_backbone(cfg.model.name, family=cfg.model.family, revision=cfg.model.revision,
                                 dtype=cfg.model.dtype, trust_pickle_weights=cfg.model.trust_pickle_weights,
                                 quantization=cfg.model.quantization,  # quantized while loading: lower peak
                                 allow_random_init=cfg.model.allow_random_init)
        data = build_dataloaders(cfg.data, backbone, seed=cfg.train.seed, task=cfg.task,
                                 require_text=task.needs_text())
    mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision, backbone.model)
    sharded = parse_flag_from_env("ACCELERATE_USE_FSDP") or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    precision = {"mixed_precision": mixed_precision, **fit_backbone_to_precision(
        backbone, cfg.model, mixed_precision, processes.device, sharded=sharded)}
    model = task.build_model(backbone, data)
    keep_trainable_fp32(model)
    accelerator = _accelerator(cfg, out, tracker, mixed_precision)
    parameters = trainable_report(model)
    accelerator.print(f"backbone {backbone.name} ({backbone.family.name}), {task.describe(data)}")
    accelerator.print(format_trainable(parameters))
    accelerator.print(f"precision {mixed_precision}; backbone weights {precision['weights']}; "
                      f"attention {precision['attention']}")
    run = Run(cfg=cfg, out=out, accelerator=accelerator, task=task, backbone=backbone, data=data, model=model,
              loaders={}, parameters=parameters, state=LoopState(settings=resume_settings(flat_config(cfg.to_dict()))),
              stopper=EarlyStopping(cfg.train.metric_for_best, cfg.train.early_stopping_patience),
              precision=precision)
    _prepare(run)
    run.before_training = task.before_training(run.model, run.loaders, accelerator)
    accelerator.init_trackers(cfg.train.project, config=flat_config(cfg.to_dict()),
                              init_kwargs=tracker_init_kwargs(cfg))
    if cfg.train.resume_from:
        _resume(run)
    if run.nonfinite is not None:
        run.nonfinite.skipped.fill_(run.state.skipped_nonfinite)
    return run


def _accelerator(cfg: Config, out: Path, tracker: str | None, mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # Each epoch's order is a function of (seed, epoch): a resumed run can skip to the exact next batch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
    )


def _prepare(run: Run) -> None:
    """Optimizer and schedule (when training), then everything through `accelerator.prepare`."""
    from transformers import get_cosine_schedule_with_warmup

    cfg, accelerator = run.cfg, run.accelerator
    loaders = run.data.loaders
    train_loader = loaders["train"]
    if not cfg.train.evaluate_only:
        run.optimizer = build_optimizer(run.model, cfg.train)
        run.steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / cfg.train.grad_accum)
        # `max_steps` set: exactly that many optimizer steps, over as many epochs as it takes (as in transformers).
        run.total_steps = cfg.train.max_steps or run.steps_per_epoch * cfg.train.epochs
        # accelerate steps a prepared scheduler once per process at each optimizer step: count in those units.
        per_step = accelerator.num_processes
        run.scheduler = get_cosine_schedule_with_warmup(
            run.optimizer, int(cfg.train.warmup_ratio * run.total_steps) * per_step, run.total_steps * per_step)
        run.model, run.optimizer, train_loader, run.scheduler = accelerator.prepare(
            run.model, run.optimizer, train_loader, run.scheduler)
    else:
        run.model = accelerator.prepare(run.model)
    run.loaders = {"train": train_loader, **{name: accelerator.prepare(loaders[name])
                                             for name in ("eval", "test") if loaders.get(name) is not None}}
    accelerator.register_save_state_pre_hook(save_trainable_only)  # frozen weights come from the backbone
    run.task.prepare(run.model, accelerator, run.data)
    run.feature_caches, run.cache_report = plan_feature_caches(run)
    for line in describe_caches(run):
        accelerator.print(line)
    if run.optimizer is not None and cfg.train.grad_accum == 1 and accelerator.num_processes == 1:
        skip = NonFiniteSkip(run.optimizer, accelerator.device)  # fused AdamW takes the flag; others: host check
        run.nonfinite = skip if skip.on_device else None


def _resume(run: Run) -> None:
    checkpoint = resolve_resume(run.out, run.cfg.train.resume_from)
    saved = verify_checkpoint(checkpoint)  # hashes first: accelerate's states are pickles
    check_same_settings(checkpoint, saved.settings, run.state.settings,
                        defaults=resume_settings(flat_config(Config().to_dict())))
    run.state = saved
    run.stopper = EarlyStopping(run.cfg.train.metric_for_best, run.cfg.train.early_stopping_patience,
                                best=saved.best, best_step=saved.best_step, misses=saved.misses)
    load_state_checked(run.accelerator, checkpoint, run.model)
    if (checkpoint / BEST_WEIGHTS).is_file():
        run.best_state = load_file(checkpoint / BEST_WEIGHTS)
    run.accelerator.print(f"resumed from {checkpoint}: step {saved.step}, epoch {saved.epoch}, "
                          f"batch {saved.batches_in_epoch}")


def fit(run: Run) -> None:
    """Optimizer steps until `max_steps` (or `epochs`), early stopping or Ctrl-C; evaluations keep the best."""
    from tqdm.auto import tqdm

    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    loader = run.loaders["train"]
    progress = tqdm(total=run.total_steps, initial=state.step,
                    disable=not (cfg.train.progress and accelerator.is_local_main_process))
    start = time.perf_counter() - state.train_seconds
    if state.step >= run.total_steps:  # resumed from the run's last checkpoint: nothing left to do
        run.stop_reason = "max_steps" if cfg.train.max_steps else "epochs"
    run.model.train()
    with stop_on_interrupt() as interrupt, caches_for(run, "train"):
        while run.stop_reason is None:
            loader.set_epoch(state.epoch)
            loader.dataset.set_epoch(state.epoch)
            step_start, step_samples = time.perf_counter(), state.samples
            for batch in accelerator.skip_first_batches(loader, state.batches_in_epoch):
                state.batches_in_epoch += 1
                loss = train_step(run, batch)
                if loss is None:  # inside a gradient-accumulation window, or a skipped window
                    continue
                state.step += 1
                progress.update(1)
                now = time.perf_counter()
                state.train_seconds = now - start
                run.step_seconds.append(now - step_start)
                run.step_samples.append(state.samples - step_samples)
                _after_step(run, loss, progress, interrupt)
                if run.stop_reason:
                    break
                step_start, step_samples = time.perf_counter(), state.samples  # evaluations are not step time
            else:  # the epoch ran to its end
                stop_decoding_cached_images(run, "train")  # loader workers start anew next epoch and see it
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if cfg.train.max_steps is None and state.epoch >= cfg.train.epochs:
                    run.stop_reason = "epochs"
    progress.close()
    if cfg.train.checkpoint_every:
        _checkpoint(run)


def _after_step(run: Run, loss: torch.Tensor, progress, interrupt) -> None:
    """Log, evaluate (keeping the best), checkpoint and decide whether to stop, after optimizer step `state.step`."""
    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    last = state.step >= run.total_steps
    if state.step % cfg.train.log_every == 0 or last:
        check_skipped(run)
        accelerator.log({"train/loss": loss.item(), "train/lr": run.scheduler.get_last_lr()[0],
                         "train/samples_per_s": state.samples / state.train_seconds,
                         "train/peak_memory_gib": peak_memory_gib()}, step=state.step)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    eval_every = cfg.train.eval_every or run.steps_per_epoch
    if run.loaders.get("eval") is not None and (state.step % eval_every == 0 or last):
        metrics = _evaluate(run, "eval")
        accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=state.step)
        state.history.append({"step": state.step, "epoch": state.epoch, **_scalars(metrics)})
        shown = dict.fromkeys((cfg.train.metric_for_best, run.task.shown_metric))
        accelerator.print(f"step {state.step}: eval " + ", ".join(f"{k} {metrics[k]:.4f}" for k in shown))
        if run.stopper.improved(metrics[cfg.train.metric_for_best], state.step):
            run.best_state = trainable_state(accelerator.unwrap_model(run.model))
            _save_best(run)
    if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
        _checkpoint(run)
    if interrupt.requested:
        path = _checkpoint(run)
        outlive_launcher()
        raise TrainingError(f"Interrupted at step {state.step}; the training state is saved in {path}.\n"
                            f"Continue with: {resume_command()}")
    if last:
        run.stop_reason = "max_steps" if cfg.train.max_steps else "epochs"
    elif run.stopper.should_stop:
        run.stop_reason = "early_stopping"


def _evaluate(run: Run, split: str, per_example: bool = False) -> dict:
    try:
        with caches_for(run, split):
            return run.task.evaluate(run.model, run.loaders[split], run.accelerator, per_example)
    except torch.OutOfMemoryError as err:
        batch = run.cfg.data.eval_batch_size or run.cfg.data.batch_size
        raise TrainingError(f"Out of memory while evaluating the {split} split with a batch of {batch}. Set "
                            f"`data.eval_batch_size={max(1, batch // 2)}`.") from err


def _save_best(run: Run) -> None:
    if run.accelerator.is_main_process:
        backbone = run.backbone
        try:
            save_adapter(run.accelerator.unwrap_model(run.model), run.out, run.cfg, backbone_name=backbone.name,
                         backbone_revision=backbone.revision, fingerprint=backbone.fingerprint)
        except SAVE_ERRORS as err:  # e.g. a full disk: safetensors and torch.save raise their own errors
            raise TrainingError(f"Could not save the adapter of step {run.state.step} into {run.out}: {err}. "
                                "The adapter saved before it, if any, is intact (saves are staged, then moved "
                                "in). Free disk space and resume from the last checkpoint, or train again.") from err


def _checkpoint(run: Run) -> Path:
    state, stopper = run.state, run.stopper
    state.best, state.best_step, state.misses = stopper.best, stopper.best_step, stopper.misses
    extra = {BEST_WEIGHTS: lambda path: save_file(run.best_state, path)} if run.best_state is not None else {}
    try:
        return save_checkpoint(run.accelerator, run.out, state, extra, keep=run.cfg.train.keep_checkpoints)
    except SAVE_ERRORS as err:  # a full disk: OSError, torch.save's RuntimeError, safetensors' SafetensorError
        raise TrainingError(f"Could not save the checkpoint of step {state.step} into {run.out}: {err}. "
                            "Earlier checkpoints are intact.") from err


def finish(run: Run) -> dict:
    """Keep the best step (not the last), evaluate eval and test, write metrics.json, log and summarise."""
    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    check_skipped(run)
    unwrapped = accelerator.unwrap_model(run.model)
    if run.best_state is not None:  # evaluate and keep the best checkpoint, not the last
        unwrapped.load_state_dict(run.best_state, strict=False)
    elif not cfg.train.evaluate_only:  # an evaluate-only run writes its metrics, no adapter: nothing was trained
        _save_best(run)
    results = {
        "best_step": run.stopper.best_step if run.best_state is not None else state.step,
        "steps": state.step,
        "stop_reason": run.stop_reason,
        "skipped_nonfinite_batches": state.skipped_nonfinite,
        "train_seconds": state.train_seconds,
        **_throughput(run),
        "peak_memory_gib": peak_memory_gib(),
        "mixed_precision": accelerator.mixed_precision,
        "precision": run.precision,
        "num_processes": accelerator.num_processes,
        "trainable_parameters": run.parameters,
        "feature_cache": run.cache_report,
        "data": run.data.report,
        "history": state.history,
        **run.before_training,
    }
    for name in ("eval", "test"):
        if run.loaders.get(name) is not None:
            results[name] = _evaluate(run, name, per_example=name == "test")  # test rows: paired comparisons
            accelerator.print(f"\n{name} ({len(run.loaders[name].dataset)} examples)\n{run.task.report(results[name])}")
            accelerator.log({f"final_{name}/{k}": v for k, v in results[name].items() if isinstance(v, float)},
                            step=state.step)
    if accelerator.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        write_metrics(run.out, results)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(run_summary(cfg, run.out, results, run.stopper))
    return results


def _release_accelerator_state() -> None:
    """Let a later `train()` in the same process (a notebook, a test) use other precision or accumulation settings:
    accelerate keeps them in a process-wide state that refuses to change once set. The distributed state (process
    group) stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _throughput(run: Run) -> dict:
    """Samples/s over this process's steps after the first `train.timing_warmup_steps` (start-up, first batches;
    all of them when there are no more), and every step's seconds (data wait included, evaluations not)."""
    warmup = run.cfg.train.timing_warmup_steps if len(run.step_seconds) > run.cfg.train.timing_warmup_steps else 0
    seconds, samples = sum(run.step_seconds[warmup:]), sum(run.step_samples[warmup:])
    return {"train_samples_per_s": samples / seconds if seconds else 0.0,  # samples of every process
            "timing_warmup_steps": warmup, "step_seconds": [round(t, 6) for t in run.step_seconds]}


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
