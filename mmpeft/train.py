"""The training loop, on Accelerate: one function that both `recipes/lora_sentiment.py` and `mmpeft train` run."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from .adapters import trainable_report
from .backbones import load_backbone
from .config import Config
from .data.loaders import build_dataloaders
from .evaluation import evaluate
from .metrics import format_report
from .model import build_classifier
from .saving import ADAPTER_FILES, MANIFEST, save_adapter
from .training_utils import (
    EarlyStopping,
    build_optimizer,
    class_weights,
    peak_memory_gib,
    resolve_mixed_precision,
    trainable_state,
)

logger = logging.getLogger("mmpeft")


def check_output_dir(cfg: Config) -> Path:
    """Refuse to train over an earlier run's adapter unless `train.overwrite` says so."""
    out = Path(cfg.train.output_dir)
    existing = [name for name in (MANIFEST, *ADAPTER_FILES) if (out / name).exists()]
    if existing and not cfg.train.overwrite:
        raise FileExistsError(f"{out} already holds a trained model ({', '.join(existing)}). Choose another "
                              "`train.output_dir`, or set `train.overwrite=true` to replace it.")
    return out


def train(cfg: Config) -> dict:
    """Fine-tune, evaluate and save; returns the final metrics (also written to `<output_dir>/metrics.json`)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    out = check_output_dir(cfg)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=_tracker(cfg.train.tracker),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(cfg.train.seed)
    with accelerator.main_process_first():  # one process builds caches (embedded backbone and data) first
        backbone = load_backbone(cfg.model.name, family=cfg.model.family, revision=cfg.model.revision,
                                 dtype=cfg.model.dtype)
        data = build_dataloaders(cfg.data, backbone, seed=cfg.train.seed)
    model = build_classifier(backbone, cfg, data.label_names)
    params = trainable_report(model, backbone.family)
    accelerator.print(f"backbone {backbone.name} ({backbone.family.name}), labels {data.label_names}")
    accelerator.print("trainable parameters: " + ", ".join(
        f"{part} {p['trainable']:,}/{p['total']:,}" for part, p in params.items()))

    optimizer = build_optimizer(model, cfg.train)
    train_loader = data.loaders["train"]
    eval_loader, test_loader = data.loaders.get("eval"), data.loaders.get("test")
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / cfg.train.grad_accum)
    total_steps = min(cfg.train.max_steps or math.inf, steps_per_epoch * cfg.train.epochs)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * total_steps), total_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loader, test_loader = (accelerator.prepare(x) if x is not None else None for x in (eval_loader, test_loader))
    weights = class_weights(data.class_counts, cfg.train.class_weights)
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(accelerator.device) if weights is not None else None,
                                  label_smoothing=cfg.train.label_smoothing)
    eval_loss = nn.CrossEntropyLoss(weight=weights)  # on the gathered CPU logits
    accelerator.init_trackers("mmpeft", config=_flat(cfg.to_dict()))

    def save(step: int) -> None:
        if accelerator.is_main_process:
            save_adapter(accelerator.unwrap_model(model), out, cfg, backbone_name=backbone.name,
                         backbone_revision=backbone.revision, fingerprint=backbone.fingerprint)

    stopper = EarlyStopping(cfg.train.metric_for_best, cfg.train.early_stopping_patience)
    eval_every = cfg.train.eval_every or steps_per_epoch
    best_state, history, step, samples, start = None, [], 0, 0, time.perf_counter()
    progress = tqdm(total=total_steps, disable=not (cfg.train.progress and accelerator.is_local_main_process))
    model.train()
    for epoch in range(cfg.train.epochs):
        for batch in train_loader:
            with accelerator.accumulate(model):
                logits = model(**batch)
                loss = loss_fn(logits.float(), batch["labels"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            samples += len(batch["labels"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % cfg.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - start
                logs = {"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0],
                        "train/samples_per_s": samples / elapsed, "train/peak_memory_gib": peak_memory_gib()}
                accelerator.log(logs, step=step)
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
            if eval_loader is not None and (step % eval_every == 0 or step == total_steps):
                metrics = evaluate(model, eval_loader, accelerator, data.label_names, eval_loss)
                accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=step)
                history.append({"step": step, "epoch": epoch, **_scalars(metrics)})
                accelerator.print(f"step {step}: eval {cfg.train.metric_for_best} "
                                  f"{metrics[cfg.train.metric_for_best]:.4f}, accuracy {metrics['accuracy']:.4f}")
                if stopper.improved(metrics[cfg.train.metric_for_best], step):
                    best_state = trainable_state(accelerator.unwrap_model(model))
                    save(step)
            if step >= total_steps or stopper.should_stop:
                break
        if step >= total_steps or stopper.should_stop:
            break
    progress.close()
    train_seconds = time.perf_counter() - start

    unwrapped = accelerator.unwrap_model(model)
    if best_state is not None:  # evaluate and keep the best checkpoint, not the last
        unwrapped.load_state_dict(best_state, strict=False)
    else:
        save(step)
    results = {
        "best_step": stopper.best_step if best_state is not None else step,
        "steps": step,
        "train_seconds": train_seconds,
        "train_samples_per_s": samples / train_seconds if train_seconds else 0.0,
        "peak_memory_gib": peak_memory_gib(),
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
        "trainable_parameters": params,
        "data": data.report,
        "history": history,
    }
    for name, loader in (("eval", eval_loader), ("test", test_loader)):
        if loader is not None:
            results[name] = evaluate(model, loader, accelerator, data.label_names, eval_loss)
            accelerator.print(f"\n{name} ({len(loader.dataset)} examples)\n{format_report(results[name])}")
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


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
