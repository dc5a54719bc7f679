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
