"""One optimizer step of the loop, and what it does when the loss is not finite or memory runs out.

Two paths. Where it can (one process, no gradient accumulation, torch's fused AdamW), the step reads nothing back
to the host: a non-finite loss or gradient is caught on the device (`faults.NonFiniteSkip`) and the count read at
log points (`check_skipped`). Otherwise each micro-batch's loss is checked on the host (all processes agree), and a
non-finite one is left out of its accumulation window.
"""

from __future__ import annotations

import torch

from ..errors import TrainingError
from .faults import loss_is_finite, out_of_memory_advice
from .run_folder import kept_in


def train_step(run, batch: dict) -> torch.Tensor | None:
    """One micro-batch; the loss after an optimizer step, None inside an accumulation window.

    A non-finite loss stops the run (naming the step) or, with `train.skip_nonfinite`, is left out of the window:
    it contributes a zero gradient instead (so data-parallel processes still synchronise), and the rest of the
    window still steps. A window with nothing finite in it makes no optimizer step.
    """
    if run.nonfinite is not None:
        return device_checked_step(run, batch)
    cfg, state, accelerator, model = run.cfg, run.state, run.accelerator, run.model
    stepped = False
    with accelerator.accumulate(model):
        try:
            loss = run.task.loss(model, batch)
            finite = loss_is_finite(loss, accelerator)
            if not finite:
                if not cfg.train.skip_nonfinite:
                    raise TrainingError(
                        f"The loss is {loss.item()} at step {state.step + 1} (epoch {state.epoch}, batch "
                        f"{state.batches_in_epoch}). {kept_in(run.out)} Lower the learning rate, or set "
                        "`train.skip_nonfinite=true`.")
                state.skipped_nonfinite += 1
                loss = sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
            run.window_finite = run.window_finite or finite
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                stepped = optimizer_step(run) if run.window_finite else skip_window(run)
        except torch.OutOfMemoryError as err:
            raise TrainingError(out_of_memory_advice(cfg.data.batch_size, cfg.train.grad_accum)) from err
    state.samples += len(batch["labels"]) * accelerator.num_processes
    if accelerator.sync_gradients:
        run.window_finite = False
    return loss.detach() if stepped else None


def device_checked_step(run, batch: dict) -> torch.Tensor:
    """One optimizer step with nothing read back to the host (one process, no accumulation, fused AdamW): a
    non-finite loss or gradient sets the flag the fused kernel reads, which then leaves the weights and the moments
    as they were (as `GradScaler` skips with `found_inf`). The step still counts toward `max_steps`, as with
    GradScaler; `check_skipped` reads the count at log points, stopping there (naming the first such step) unless
    `train.skip_nonfinite`."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    with accelerator.accumulate(model):
        try:
            loss = run.task.loss(model, batch)
            accelerator.backward(loss)
            norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm) \
                if cfg.train.max_grad_norm else None
            run.nonfinite.check(loss, model.parameters(), run.state.step + 1, norm)  # frozen ones: no grad
            optimizer_step(run, clip=False)
        except torch.OutOfMemoryError as err:
            raise TrainingError(out_of_memory_advice(cfg.data.batch_size, cfg.train.grad_accum)) from err
    run.state.samples += len(batch["labels"])
    return loss.detach()


def check_skipped(run) -> None:
    """Read the device's count of skipped non-finite steps (a host sync: at log points only)."""
    if run.nonfinite is None:
        return
    skipped, first = run.nonfinite.pending()
    run.state.skipped_nonfinite = skipped
    if first is not None and not run.cfg.train.skip_nonfinite:
        raise TrainingError(
            f"The loss or its gradients were not finite at step {first} (seen at step {run.state.step}: the count is "
            "read at log points); the updates of such steps were skipped, so the weights never took one. "
            f"{kept_in(run.out)} Lower the learning rate, or set `train.skip_nonfinite=true`.")


def optimizer_step(run, clip: bool = True) -> bool:
    if clip and run.cfg.train.max_grad_norm:
        run.accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.train.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return True


def skip_window(run) -> bool:
    run.optimizer.zero_grad(set_to_none=True)
    return False
