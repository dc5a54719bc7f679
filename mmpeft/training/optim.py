"""Pieces of the training loop: optimizer groups, class weights, precision choice, early stopping, memory."""

from __future__ import annotations

import resource
import sys
from functools import lru_cache

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import ConfigError


def param_kind(name: str) -> str:
    """`head`, `lora` or `full`: which learning rate a trainable parameter takes."""
    if name.startswith("head.") and "lora_" not in name:
        return "head"
    return "lora" if "lora_" in name else "full"


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only: per-kind learning rates, no weight decay on biases and norms.

    `train.optimizer=adamw_8bit` keeps both moments in 8 bits (bitsandbytes; 2 bytes per parameter instead of 8),
    `paged_adamw_8bit` also pages them to host memory when the GPU runs short (on the CPU it is `adamw_8bit`).
    """
    lrs = {"head": cfg.lr_head, "lora": cfg.lr_lora, "full": cfg.lr_full}
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decay = param.ndim >= 2 and "logit_scale" not in name
            groups.setdefault((param_kind(name), decay), []).append(param)
    if not groups:
        raise ConfigError("Nothing to train: every tower and the head are frozen. Set `model.text.mode`, "
                         "`model.vision.mode` or `head.mode` to `lora` or `full`.")
    param_groups = [
        {"params": params, "lr": lrs[kind], "weight_decay": cfg.weight_decay if decay else 0.0, "name": kind}
        for (kind, decay), params in groups.items()
    ]
    if cfg.optimizer != "adamw":
        return _bnb_adamw(param_groups, cfg.optimizer)
    return torch.optim.AdamW(param_groups, fused=can_fuse([p for g in param_groups for p in g["params"]]) or None)


FUSED_DEVICE_TYPES = ("cuda", "cpu")  # torch >= 2.4 has a fused AdamW kernel for both


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: floating point, all on one kind of device it supports.

    One kernel over every tensor instead of a dozen per tensor: on the CPU (torch 2.14) it is also faster and,
    on CUDA and the CPU alike, lets a non-finite step be skipped on the device (`faults.NonFiniteSkip`).
    """
    kinds = {p.device.type for p in params}
    return (len(kinds) == 1 and kinds <= set(FUSED_DEVICE_TYPES)
            and all(torch.is_floating_point(p) for p in params))


def _bnb_adamw(param_groups: list[dict], kind: str) -> torch.optim.Optimizer:
    from ..quant import require_bnb

    require_bnb(f"`train.optimizer={kind}`")
    import bitsandbytes as bnb

    # Paging moves optimizer state between GPU and host memory; without a GPU there is nothing to page.
    paged = kind == "paged_adamw_8bit" and torch.cuda.is_available()
    return (bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit)(param_groups)


def class_weights(counts: list[int], policy: str) -> torch.Tensor | None:
    """`balanced`: n_samples / (n_classes * n_c), as scikit-learn defines it."""
    if policy == "none" or not counts:
        return None
    counts_t = torch.tensor(counts, dtype=torch.float32)
    if (counts_t == 0).any():
        raise ConfigError(f"`train.class_weights=balanced` needs every class in the training data; counts {counts}.")
    return counts_t.sum() / (len(counts) * counts_t)


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX-512 BF16 or AMX), where autocast pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# On the CPU bf16 autocast pays only when the matrix products are wide enough to outweigh the casts around them:
# batch 32, the tiny default (width 128) runs 0.17-0.21 s/step in bf16 against 0.19 in fp32; ViT-B/32 shapes
# (widths 512/768) run twice as fast in bf16 (benchmarks/README.md, "Precision on the CPU").
CPU_BF16_MIN_WIDTH = 256


def median_linear_width(model: nn.Module) -> int:
    """The median input width of the model's linear layers: what sets the size of its matrix products."""
    widths = sorted(m.in_features for m in model.modules() if isinstance(m, nn.Linear))
    return widths[len(widths) // 2] if widths else 0


def resolve_mixed_precision(choice: str, model: nn.Module | None = None) -> str:
    """`auto` picks bf16 on CUDA devices, and on CPUs with bf16 instructions where the model's matrix products are
    wide enough for it to pay (`model` given: median linear width >= CPU_BF16_MIN_WIDTH); fp32 elsewhere."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if not cpu_supports_bf16():
        return "no"
    return "bf16" if model is None or median_linear_width(model) >= CPU_BF16_MIN_WIDTH else "no"


def peak_memory_gib() -> float:
    """Peak allocated CUDA memory, or this program's peak resident set on CPU.

    On Linux it is VmHWM, the high-water mark of this program's own memory: `ru_maxrss` would also count the
    peak of whatever process forked it before `exec` (the `accelerate launch` launcher, with torch imported).
    """
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable parameters: enough to restore the best step later."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


class EarlyStopping:
    """Tracks the best value of a metric (lower is better for `loss`) and stops after `patience` misses."""

    def __init__(self, metric: str, patience: int | None, *, best: float | None = None,
                 best_step: int | None = None, misses: int = 0):
        self.sign = -1.0 if metric == "loss" else 1.0
        self.patience = patience
        self.best, self.best_step, self.misses = best, best_step, misses  # non-default when resuming

    def improved(self, value: float, step: int) -> bool:
        if self.best is None or self.sign * value > self.sign * self.best:
            self.best, self.best_step, self.misses = value, step, 0
            return True
        self.misses += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.misses >= self.patience
