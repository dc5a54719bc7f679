"""What the loop does when things go wrong: NaN/inf losses, out-of-memory, Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import TrainingError  # noqa: F401  (raised here; importable from here too)


def loss_is_finite(loss: torch.Tensor, accelerator) -> bool:
    """True when the loss is finite on every process (all ranks must agree to skip or stop together)."""
    finite = torch.isfinite(loss.detach()).all().to(torch.int32).reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="sum") == accelerator.num_processes
    return bool(finite.all())


def out_of_memory_advice(batch_size: int, grad_accum: int) -> str:
    half = max(1, batch_size // 2)
    return (f"Out of GPU memory with data.batch_size={batch_size}. Try: data.batch_size={half} "
            f"train.grad_accum={grad_accum * 2} (same effective batch); model.gradient_checkpointing=true; "
            "a frozen tower (model.vision.mode=frozen) or 4-bit quantization (model.quantization.bits=4).")


class StopRequest:
    """Set by the first Ctrl-C (SIGINT); the loop checkpoints at the next step and exits. A second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def stop_on_interrupt():
    """Route Ctrl-C to a `StopRequest` for the duration of training (main thread only)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = signal.signal(signal.SIGINT, request.handle)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)


class NonFiniteSkip:
    """Skips an optimizer step whose loss or gradients are NaN/inf without reading anything back to the host.

    `loss_is_finite` reads the loss at every step, which on a GPU waits for the whole step to finish. Here the check
    stays on the device, as `GradScaler` does with `found_inf`: the flag is handed to torch's fused AdamW, whose
    kernel leaves the parameters, the moments and the step count untouched when it is set. Skipped steps are
    counted, and the first one remembered, on the device too; `pending()` reads both (one sync) at log points, so
    the loop can still stop naming the step (weights never took the bad update) or count the skipped ones. Under
    several processes the gradients are all-reduced before the check, so every rank sees the same flag.
    Optimizers without a fused kernel (bitsandbytes' 8-bit AdamW) cannot take the flag: `on_device` is False and
    the loop keeps the host check for them.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device | str):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        self.on_device = bool(self.optimizer.defaults.get("fused"))
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)

    def check(self, loss: torch.Tensor, parameters, step: int, grad_norm: torch.Tensor | None = None) -> None:
        """Set the flag for this optimizer step (after backward and clipping, before `optimizer.step()`).

        `grad_norm`: the total norm `clip_grad_norm_` returned, if it ran (saves a pass over the gradients).
        """
        if grad_norm is None:
            grads = [p.grad for p in parameters if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
        bad = ~(torch.isfinite(loss.detach()).all() & torch.isfinite(grad_norm.detach()))
        self.found_inf.copy_(bad)
        self.skipped.add_(bad)
        self.first_step.copy_(torch.where((self.first_step < 0) & bad, step, self.first_step))
        if self.on_device:
            self.optimizer.found_inf = self.found_inf

    def pending(self) -> tuple[int, int | None]:
        """(steps skipped so far, the first skipped step or None): reads the device, call it at log points only."""
        first = int(self.first_step)
        return int(self.skipped), first if first >= 0 else None

    def detach(self) -> None:
        """Take the flag off the optimizer (before saving or reusing it elsewhere)."""
        if getattr(self.optimizer, "found_inf", None) is self.found_inf:
            del self.optimizer.found_inf


def launched_by_accelerate() -> bool:
    """Whether this process was started by `accelerate launch` (its parent's command line says so)."""
    try:
        return b"accelerate" in Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return False


def outlive_launcher(timeout: float = 3.0) -> None:
    """Under `accelerate launch`, a terminal Ctrl-C reaches the launcher too: it waits 0.25 s for this process, then
    prints its own KeyboardInterrupt traceback and exits. Wait (at most `timeout`) for it to be gone, so that this
    run's message, the resume command, is the last thing on the terminal."""
    parent = os.getppid()
    if not launched_by_accelerate():
        return
    deadline = time.monotonic() + timeout
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.05)


def resume_command() -> str:
    """The command line that continues this run: the one that started it, plus `train.resume_from=latest`."""
    import shlex
    import sys

    argv = [a for a in sys.argv[1:] if not a.startswith("train.resume_from=")]
    if Path(sys.argv[0]).name in ("mmpeft", "cli.py"):
        program = "mmpeft"
    else:
        program = f"{'accelerate launch' if launched_by_accelerate() else 'python'} {sys.argv[0]}"
    return shlex.join([*program.split(), *argv, "train.resume_from=latest"])
