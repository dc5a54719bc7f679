"""The few lines every run ends with: where it saved what, why it stopped, how fast, and what to run next."""

from __future__ import annotations

from pathlib import Path

from ..config import Config

_WHY = {
    "max_steps": "reached train.max_steps={max_steps}",
    "epochs": "ran train.epochs={epochs} epoch(s)",
    "early_stopping": "early stopping: {patience} evaluation(s) without improving {metric}",
    "evaluate_only": "train.evaluate_only: evaluated the model as built, no training",
}


def stop_detail(cfg: Config, reason: str | None) -> str:
    """Why a run stopped, in words."""
    template = _WHY.get(reason or "", "stopped ({reason})")
    return template.format(max_steps=cfg.train.max_steps, epochs=cfg.train.epochs, reason=reason,
                           patience=cfg.train.early_stopping_patience, metric=cfg.train.metric_for_best)


def run_summary(cfg: Config, out: Path, results: dict, stopper) -> str:
    """Output folder, best step and metric, why it stopped, time, samples/s, peak memory, next commands."""
    metric = cfg.train.metric_for_best
    saved = "metrics.json" if cfg.train.evaluate_only else "adapter, head, run record mmpeft.json, metrics.json"
    lines = ["", f"run saved in {out}/ ({saved})"]
    if stopper.best is not None:
        lines.append(f"best: step {results['best_step']}, eval {metric} {stopper.best:.4f} (the saved adapter)")
    for split in ("test", "eval"):
        if split in results and metric in results[split]:
            lines.append(f"{split}: {metric} {results[split][metric]:.4f}")
            break
    lines.append(f"stopped after {results['steps']} step(s): {stop_detail(cfg, results['stop_reason'])}")
    if results["train_seconds"]:
        lines.append(f"time {results['train_seconds']:.1f} s training, {results['train_samples_per_s']:.1f} "
                     f"samples/s, peak memory {results['peak_memory_gib']:.2f} GiB")
    if results.get("skipped_nonfinite_batches"):
        lines.append(f"skipped {results['skipped_nonfinite_batches']} batch(es) with a non-finite loss")
    lines.append(f"next: mmpeft eval --adapter {out} --data TEST.jsonl")
    if cfg.task == "classification":
        lines.append(f"      mmpeft predict --adapter {out} --image IMAGE.jpg --text \"...\"")
    return "\n".join(lines)
