"""The training loop, on Accelerate: one function that `recipes/lora_sentiment.py`, `recipes/lora_retrieval.py` and
`mmpeft train` run. `cfg.task` picks the model, the loss and the evaluation; the loop is the same."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..backbones import load_backbone
from ..config import Config
from ..data.loaders import build_dataloaders
from ..errors import PathExistsError
from ..models.adapters import trainable_report
from ..models.classifier import build_classifier
from ..models.retrieval import (
    build_retrieval_model,
    contrastive_loss_across_processes,
    evaluate_retrieval,
    format_retrieval_report,
)
from ..models.saving import ADAPTER_FILES, MANIFEST, save_adapter
from .checkpoints import (
    LoopState,
    check_same_settings,
    resolve_resume,
    resume_settings,
    save_checkpoint,
    verify_checkpoint,
)
from .evaluation import evaluate
from .faults import (
    TrainingError,
    loss_is_finite,
    out_of_memory_advice,
    stop_on_interrupt,
)
from .metrics import format_report
from .optim import (
    EarlyStopping,
    build_optimizer,
    class_weights,
    peak_memory_gib,
    resolve_mixed_precision,
    trainable_state,
)

logger = logging.getLogger("mmpeft")
BEST_WEIGHTS = "best_trainable.safetensors"


def check_output_dir(cfg: Config) -> Path:
    """Refuse to train over an earlier run's adapter unless resuming it or `train.overwrite` says so."""
    out = Path(cfg.train.output_dir)
    existing = [name for name in (MANIFEST, *ADAPTER_FILES) if (out / name).exists()]
    if existing and not (cfg.train.overwrite or cfg.train.resume_from):
        raise PathExistsError(f"{out} already holds a trained model ({', '.join(existing)}). Choose another "
                              "`train.output_dir`, set `train.resume_from=latest` to continue it, or "
                              "`train.overwrite=true` to replace it.")
    return out


def train(cfg: Config) -> dict:
    """Fine-tune, evaluate and save; returns the final metrics (also written to `<output_dir>/metrics.json`)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    out = check_output_dir(cfg)
    retrieval = cfg.task == "retrieval"
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=_tracker(cfg.train.tracker),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # Each epoch's order is a function of (seed, epoch): a resumed run can skip to the exact next batch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
    )
    set_seed(cfg.train.seed)
    with accelerator.main_process_first():  # one process builds caches (embedded backbone and data) first
        backbone = load_backbone(cfg.model.name, family=cfg.model.family, revision=cfg.model.revision,
                                 dtype=cfg.model.dtype, trust_pickle_weights=cfg.model.trust_pickle_weights,
                                 quantization=cfg.model.quantization)  # quantized while loading: lower peak
        data = build_dataloaders(cfg.data, backbone, seed=cfg.train.seed, task=cfg.task,
                                 require_text=retrieval or cfg.head.reads_captions)
    model = build_retrieval_model(backbone, cfg) if retrieval else build_classifier(backbone, cfg, data.label_names)
    params = trainable_report(model, backbone.family)
    accelerator.print(f"backbone {backbone.name} ({backbone.family.name}), "
                      + ("task retrieval" if retrieval else f"labels {data.label_names}"))
    accelerator.print("trainable parameters: " + ", ".join(
        f"{part} {p['trainable']:,}/{p['total']:,}" for part, p in params.items()))

    optimizer = build_optimizer(model, cfg.train)
    train_loader = data.loaders["train"]
    eval_loader, test_loader = data.loaders.get("eval"), data.loaders.get("test")
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / cfg.train.grad_accum)
    total_steps = min(cfg.train.max_steps or math.inf, steps_per_epoch * cfg.train.epochs)
    # accelerate steps a prepared scheduler once per process at each optimizer step: count in those units.
    per_step = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * total_steps) * per_step,
                                                total_steps * per_step)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loader, test_loader = (accelerator.prepare(x) if x is not None else None for x in (eval_loader, test_loader))
    accelerator.register_save_state_pre_hook(_save_trainable_only)  # frozen weights come from the backbone
    zero_shot = {}
    if retrieval:  # contrastive loss against every process's pairs; recall@k over a whole split
        logit_scale = accelerator.unwrap_model(model).logit_scale

        def step_loss(batch: dict) -> torch.Tensor:
            image, text = model(**batch, embed=True)
            return contrastive_loss_across_processes(image, text, logit_scale)

        def evaluate_split(loader) -> dict:
            return evaluate_retrieval(model, loader, accelerator)

        report = format_retrieval_report
        # Recall of the towers before any update (when resuming too: the saved state is loaded below).
        for name, loader in (("eval", eval_loader), ("test", test_loader)):
            if loader is not None:
                zero_shot[name] = evaluate_split(loader)
                accelerator.print(f"zero-shot {name} ({len(loader.dataset)} pairs)\n{report(zero_shot[name])}")
    else:
        weights = class_weights(data.class_counts, cfg.train.class_weights)
        cross_entropy = nn.CrossEntropyLoss(weight=weights.to(accelerator.device) if weights is not None else None,
                                            label_smoothing=cfg.train.label_smoothing)
        eval_loss = nn.CrossEntropyLoss(weight=weights)  # on the gathered CPU logits

        def step_loss(batch: dict) -> torch.Tensor:
            return cross_entropy(model(**batch).float(), batch["labels"])

        def evaluate_split(loader) -> dict:
            return evaluate(model, loader, accelerator, data.label_names, eval_loss)

        report = format_report
    accelerator.init_trackers("mmpeft", config=_flat(cfg.to_dict()))

    state, best_state = LoopState(settings=resume_settings(_flat(cfg.to_dict()))), None
    if cfg.train.resume_from:
        checkpoint = resolve_resume(out, cfg.train.resume_from)
        saved = verify_checkpoint(checkpoint)  # hashes first: accelerate's states are pickles
        check_same_settings(checkpoint, saved.settings, state.settings)
        state = saved
        accelerator.load_state(str(checkpoint), strict=False)
        if (checkpoint / BEST_WEIGHTS).is_file():
            best_state = load_file(checkpoint / BEST_WEIGHTS)
        accelerator.print(f"resumed from {checkpoint}: step {state.step}, epoch {state.epoch}, "
                          f"batch {state.batches_in_epoch}")
    stopper = EarlyStopping(cfg.train.metric_for_best, cfg.train.early_stopping_patience,
                            best=state.best, best_step=state.best_step, misses=state.misses)

    def save_best() -> None:
        if accelerator.is_main_process:
            save_adapter(accelerator.unwrap_model(model), out, cfg, backbone_name=backbone.name,
                         backbone_revision=backbone.revision, fingerprint=backbone.fingerprint)

    def checkpoint() -> Path:
        state.best, state.best_step, state.misses = stopper.best, stopper.best_step, stopper.misses
        extra = {BEST_WEIGHTS: lambda path: save_file(best_state, path)} if best_state is not None else {}
        try:
            return save_checkpoint(accelerator, out, state, extra, keep=cfg.train.keep_checkpoints)
        except OSError as err:
            raise TrainingError(f"Could not save the checkpoint of step {state.step} into {out}: {err}. "
                                "Earlier checkpoints are intact.") from err

    eval_every = cfg.train.eval_every or steps_per_epoch
    progress = tqdm(total=total_steps, initial=state.step,
                    disable=not (cfg.train.progress and accelerator.is_local_main_process))
    start = time.perf_counter() - state.train_seconds
    model.train()
    with stop_on_interrupt() as interrupt:
        while state.epoch < cfg.train.epochs and state.step < total_steps and not stopper.should_stop:
            train_loader.set_epoch(state.epoch)
            train_loader.dataset.set_epoch(state.epoch)
            batches = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            for batch in batches:
                state.batches_in_epoch += 1
                with accelerator.accumulate(model):
                    try:
                        loss = step_loss(batch)
                        if not loss_is_finite(loss, accelerator):
                            if not cfg.train.skip_nonfinite:
                                raise TrainingError(
                                    f"The loss is {loss.item()} at step {state.step + 1} (epoch {state.epoch}, "
                                    f"batch {state.batches_in_epoch}). Kept: the last checkpoint and best adapter "
                                    f"in {out}. Lower the learning rate, or set `train.skip_nonfinite=true`.")
                            state.skipped_nonfinite += 1
                            optimizer.zero_grad(set_to_none=True)
                            continue
                        accelerator.backward(loss)
                    except torch.OutOfMemoryError as err:
                        raise TrainingError(out_of_memory_advice(cfg.data.batch_size, cfg.train.grad_accum)) from err
                    if accelerator.sync_gradients and cfg.train.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state.samples += len(batch["labels"]) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                progress.update(1)
                if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                    state.train_seconds = time.perf_counter() - start
                    accelerator.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0],
                                     "train/samples_per_s": state.samples / state.train_seconds,
                                     "train/peak_memory_gib": peak_memory_gib()}, step=state.step)
                    progress.set_postfix(loss=f"{loss.item():.4f}")
                if eval_loader is not None and (state.step % eval_every == 0 or state.step == total_steps):
                    metrics = evaluate_split(eval_loader)
                    accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)},
                                    step=state.step)
                    state.history.append({"step": state.step, "epoch": state.epoch, **_scalars(metrics)})
                    shown = dict.fromkeys((cfg.train.metric_for_best, "recall_mean" if retrieval else "accuracy"))
                    accelerator.print(f"step {state.step}: eval " + ", ".join(f"{k} {metrics[k]:.4f}" for k in shown))
                    if stopper.improved(metrics[cfg.train.metric_for_best], state.step):
                        best_state = trainable_state(accelerator.unwrap_model(model))
                        save_best()
                state.train_seconds = time.perf_counter() - start
                if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                    checkpoint()
                if interrupt.requested:
                    path = checkpoint()
                    raise TrainingError(f"Interrupted at step {state.step}; the training state is saved in "
                                        f"{path}. Continue with `train.resume_from=latest`.")
                if state.step >= total_steps or stopper.should_stop:
                    break
            else:  # the epoch ran to its end
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    progress.close()
    if cfg.train.checkpoint_every:
        checkpoint()

    unwrapped = accelerator.unwrap_model(model)
    if best_state is not None:  # evaluate and keep the best checkpoint, not the last
        unwrapped.load_state_dict(best_state, strict=False)
    else:
        save_best()
    results = {
        "best_step": stopper.best_step if best_state is not None else state.step,
        "steps": state.step,
        "skipped_nonfinite_batches": state.skipped_nonfinite,
        "train_seconds": state.train_seconds,
        "train_samples_per_s": state.samples / state.train_seconds if state.train_seconds else 0.0,
        "peak_memory_gib": peak_memory_gib(),
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
        "trainable_parameters": params,
        "data": data.report,
        "history": state.history,
        **{f"zero_shot_{name}": metrics for name, metrics in zero_shot.items()},
    }
    for name, loader in (("eval", eval_loader), ("test", test_loader)):
        if loader is not None:
            results[name] = evaluate_split(loader)
            accelerator.print(f"\n{name} ({len(loader.dataset)} examples)\n{report(results[name])}")
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _save_trainable_only(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
    """accelerate save_state hook: checkpoints hold trainable weights only, not a copy of the frozen backbone."""
    for i, model in enumerate(models):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in weights[i].items() if k in trainable}


def _tracker(choice: str | None):
    if choice != "auto":
        return choice
    from accelerate.utils import is_tensorboard_available

    return "tensorboard" if is_tensorboard_available() else None


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested config as flat scalar hyper-parameters, as trackers want them."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

