"""Frozen-tower feature cache: a tower that cannot change between epochs runs once per example, not once per epoch.

A tower's pooled output is reused when the tower is frozen, carries no LoRA, sees no augmentation and has no
dropout or BatchNorm in train mode; `cache_blockers` names whatever stops it. The key is a full SHA-256 of the
tower's weights and buffers (the load fingerprint samples weights and is the same for fp32 and bf16 loads, whose
features differ), their dtypes, the quantization, the autocast setting, the device type, the family's pooling,
the padding and text length (text) or the image processor's settings (vision), and the inputs themselves (each
image file's bytes; each caption's token ids). Features live in memory, or memory-mapped under `root/<key>/` so
that a fresh process (the comparison runs each configuration in one) finds them. Only pooled outputs are cached:
a head that reads token states (`cross_attention`) turns the cache off.

The model side is `DualTowers.feature_caches` ({tower: FeatureCache}, None = off); batches carry `index` (the
example's position in its split), which `FusionClassifier.forward` passes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..backbones.registry import TowerOutput

logger = logging.getLogger(__name__)
CACHE_FORMAT = 1


def cache_blockers(model, tower: str, *, augment: bool = False, head_reads_tokens: bool = False,
                   num_processes: int = 1) -> list[str]:
    """Why `tower`'s outputs cannot be reused across epochs (empty: they can). Call with the model in train mode."""
    reasons = []
    if model.tower_modes[tower] != "frozen":
        reasons.append(f"the {tower} tower trains (mode {model.tower_modes[tower]})")
    modules = tower_modules(model, tower)
    if any("lora_" in name for m in modules for name, _ in m.named_parameters()):
        reasons.append(f"the {tower} tower carries LoRA layers")
    if augment:
        reasons.append(f"{'image' if tower == 'vision' else 'text'} augmentation changes the {tower} inputs every epoch")
    for m in modules:
        for name, sub in m.named_modules():
            if sub.training and isinstance(sub, nn.modules.batchnorm._BatchNorm):
                reasons.append(f"BatchNorm {name} of the {tower} tower is in train mode")
            elif sub.training and isinstance(sub, nn.Dropout) and sub.p > 0:
                reasons.append(f"dropout {name} (p={sub.p}) of the {tower} tower is in train mode")
    if head_reads_tokens:
        reasons.append("the head reads token states, and only pooled outputs are cached")
    if num_processes > 1:
        reasons.append("several processes: each sees other examples every epoch, so no cache would fill")
    return reasons


def tower_modules(model, tower: str) -> list[nn.Module]:
    return [model.base.get_submodule(name) for name in model.family.tower_modules[tower]]


def tower_weights_sha256(modules: list[nn.Module]) -> str:
    """SHA-256 of every weight and buffer of the tower, exactly (names, dtypes, shapes and all bytes)."""
    digest = hashlib.sha256()
    for i, module in enumerate(modules):
        state = module.state_dict()
        for name in sorted(state):
            value = state[name]
            if not isinstance(value, torch.Tensor):  # bitsandbytes' quant-state entries are tensors; be safe
                digest.update(f"{i}.{name}={value!r};".encode())
                continue
            tensor = value.detach().to("cpu").contiguous()
            digest.update(f"{i}.{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def inputs_sha256(dataset, tower: str) -> str:
    """SHA-256 of what the tower reads, example by example: image files' bytes, or captions' token ids."""
    digest = hashlib.sha256()
    for i, example in enumerate(dataset.examples):
        if tower == "text":
            digest.update(json.dumps(dataset.input_ids[i]).encode())
        elif example.load_image is not None:  # inline image of a datasets folder
            digest.update(example.load_image().tobytes())
        else:
            digest.update(Path(example.image).read_bytes())
        digest.update(b"|")
    return digest.hexdigest()


def cache_key(model, tower: str, dataset, *, mixed_precision: str, device: torch.device | str,
              text_length: int | None = None, padding: str | None = None, image_processor=None,
              quantization=None, weights_sha256: str | None = None) -> str:
    """Everything the tower's outputs depend on, hashed (see the module docstring). `weights_sha256`: the tower's
    `tower_weights_sha256`, when the caller already has it (several splits of one run share it)."""
    modules = tower_modules(model, tower)
    dtypes = sorted({str(p.dtype) for m in modules for p in m.parameters()})
    encode = model.family.encode_text if tower == "text" else model.family.encode_image
    settings = {
        "format": CACHE_FORMAT, "family": model.family.name, "tower": tower, "pooling": encode.__qualname__,
        "weights": weights_sha256 or tower_weights_sha256(modules), "dtypes": dtypes,
        "quantization": repr(quantization),
        "autocast": mixed_precision, "device": torch.device(device).type, "inputs": inputs_sha256(dataset, tower),
        "examples": len(dataset),
    }
    if tower == "text":
        settings.update(text_length=text_length, padding=padding)
    elif image_processor is not None:
        settings["image_processor"] = image_processor.to_dict()
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class FeatureCache:
    """Pooled outputs of one tower for the `size` examples of one split, in memory or memory-mapped under `root`.

    `output(index, compute)` returns the cached rows when every example of the batch is cached, else runs
    `compute()` and keeps its pooled rows. Once all examples are in, a disk cache is marked complete and a later
    process maps it instead of computing anything.
    """

    def __init__(self, key: str, size: int, root: str | os.PathLike | None = None):
        self.key, self.size = key, size
        self.folder = Path(root) / key if root is not None else None
        self.pooled: torch.Tensor | None = None
        self.filled = torch.zeros(size, dtype=torch.bool)
        if self.folder is not None and (self.folder / "complete.json").is_file():
            meta = json.loads((self.folder / "complete.json").read_text())
            dtype = getattr(torch, meta["dtype"])
            numel = meta["shape"][0] * meta["shape"][1]
            self.pooled = torch.from_file(str(self.folder / "pooled.bin"), shared=False, size=numel,
                                          dtype=dtype).view(*meta["shape"])
            self.filled[:] = True

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def output(self, index: torch.Tensor, compute: Callable[[], TowerOutput]) -> TowerOutput:
        rows = index.to("cpu")
        if self.pooled is not None and bool(self.filled[rows].all()):
            return TowerOutput(self.pooled[rows].to(index.device), None, None)
        out = compute()
        self._store(rows, out.pooled.detach())
        return out

    def _store(self, rows: torch.Tensor, pooled: torch.Tensor) -> None:
        if self.pooled is None:
            shape = (self.size, pooled.shape[-1])
            self.pooled = torch.empty(shape, dtype=pooled.dtype)
        self.pooled[rows] = pooled.to("cpu", self.pooled.dtype)
        self.filled[rows] = True
        if self.complete and self.folder is not None:
            self._write()

    def _write(self) -> None:
        """Raw bytes + a marker written last: a cache cut off half-way is never read as complete."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pooled.contiguous().view(torch.uint8).numpy().tofile(self.folder / "pooled.bin")
        meta = {"shape": list(self.pooled.shape), "dtype": str(self.pooled.dtype).removeprefix("torch.")}
        (self.folder / "complete.json").write_text(json.dumps(meta))
        logger.info("feature cache %s complete: %d examples", self.folder, self.size)
