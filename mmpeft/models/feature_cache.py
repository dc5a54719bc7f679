"""Frozen-tower feature cache: a tower that cannot change between epochs runs once per example, not once per epoch.

A tower's pooled output is reused when the tower is frozen, carries no LoRA, sees no augmentation and has no
dropout or BatchNorm in train mode; `cache_blockers` names whatever stops it. The key is a full SHA-256 of the
tower's weights and buffers (the load fingerprint samples weights and is the same for fp32 and bf16 loads, whose
features differ), their dtypes, the quantization, the autocast setting, the attention implementation (eager and
SDPA differ in the last bits), the device type, the family's pooling,
the padding and text length (text) or the image processor's settings (vision), and the inputs themselves (each
image file's bytes; each caption's token ids). Features live in memory, or memory-mapped under `root/<key>/` so
that a fresh process (the comparison runs each configuration in one) finds them. Only pooled outputs are cached:
a head that reads token states (`cross_attention`) turns the cache off.

A tower with LoRA on its last N layers only (`model.<tower>.lora.layers=N`, or `lora.targets` that leave the
lower layers alone) caches the hidden states that enter its first adapted layer instead (`StateCache`,
models/state_cache.py; the split forward is models/partial_towers.py, written for CLIP's towers and a dual
encoder's BERT-style text tower): each later epoch runs only the adapted layers, the final norm, the pooling and
the projection.
`partial_cache_blockers` says what stops it: another family, LoRA below the encoder layers or on layers that are
not one top block, anything else training below the split, augmentation, several processes, and, for the
training split only (evaluation runs in eval mode), dropout or BatchNorm below the split in train mode
(`DualTowers.train()` keeps LoRA towers there: CLIP's attention_dropout=0 layers qualify, BERT's hidden dropout
0.1 does not). Its key is `cache_key(..., below_layer=k)`: the same fields over only the embeddings and layers
below k, plus k and the layer count, so the LoRA weights that train above the split never change it.

The model side is `DualTowers.feature_caches` ({tower: FeatureCache or StateCache}, None = off); batches carry
`index` (the example's position in its split), which `FusionClassifier.forward` passes on.
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
from .cache_files import is_complete, read_complete, write_complete
from .partial_towers import partial_tower, split_missing
from .precision import transformers_models

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
        reasons.append(_augment_reason(tower))
    reasons += nondeterministic(dict(zip(model.family.tower_modules[tower], modules)), tower)
    if head_reads_tokens:
        reasons.append("the head reads token states, and only pooled outputs are cached")
    if num_processes > 1:
        reasons.append("several processes: each sees other examples every epoch, so no cache would fill")
    return reasons


def _augment_reason(tower: str) -> str:
    return f"{'image' if tower == 'vision' else 'text'} augmentation changes the {tower} inputs every epoch"


def nondeterministic(modules: dict[str, nn.Module], tower: str) -> list[str]:
    """Modules whose train-mode output is random (dropout, also the float `dropout` attention modules such as
    CLIPAttention pass to the attention function) or moves with the batch (BatchNorm)."""
    found = {"dropout": [], "BatchNorm": []}
    for prefix, m in modules.items():
        for name, sub in m.named_modules(prefix=prefix):
            p = sub.p if isinstance(sub, nn.Dropout) else getattr(sub, "dropout", None)
            if not sub.training:
                continue
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                found["BatchNorm"].append(name)
            elif isinstance(p, float) and p > 0:
                found["dropout"].append(f"{name} (p={p})")
    # the first of each kind by name, the rest counted: a BERT tower has a dropout in every sublayer
    return [f"{kind} {names[0]} of the {tower} tower is in train mode"
            + (f" (and {len(names) - 1} more {kind} modules)" if len(names) > 1 else "")
            for kind, names in found.items() if names]


def partial_cache_blockers(model, tower: str, *, augment: bool = False, num_processes: int = 1) -> list[str]:
    """Why the hidden states entering the first LoRA layer of `tower` cannot be reused across epochs (empty: they
    can). Call with the model in train mode: `DualTowers.train()` keeps LoRA towers there, so a dropout below the
    first adapted layer (BERT / MiniLM's hidden dropout 0.1) draws anew every epoch, while CLIP's
    attention_dropout=0 layers do not."""
    split = partial_tower(model, tower)
    if split is None:
        return [split_missing(model, tower)]
    reasons, below = lora_layout(model, tower), first_adapted_layer(model, tower)
    if below is not None:
        below_modules = dict(zip(split.below_names(below), split.below_modules(model.base, below)))
        trained = [f"{prefix}.{n}" for prefix, m in below_modules.items()
                   for n, p in m.named_parameters() if p.requires_grad and "lora_" not in n]  # LoRA: said above
        reasons += [f"{name} trains, below the first adapted layer {below}" for name in trained[:3]]
        reasons += nondeterministic(below_modules, tower)
    if augment:
        reasons.append(_augment_reason(tower))
    if num_processes > 1:
        reasons.append("several processes: each sees other examples every epoch, so no cache would fill")
    return reasons


def _tower_lora_names(model, tower: str) -> list[str]:
    from .adapters import lora_module_names

    return [n for n in lora_module_names(model.base) if model.family.tower_of(n) == tower]


def first_adapted_layer(model, tower: str) -> int | None:
    """The lowest encoder layer of `tower` that carries LoRA, or None (no split forward, or no LoRA in layers)."""
    split = partial_tower(model, tower)
    layers = [split.layer_index(n) for n in _tower_lora_names(model, tower)] if split is not None else []
    return min((i for i in layers if i is not None), default=None)


def lora_layout(model, tower: str) -> list[str]:
    """What stops a split at the first adapted layer: LoRA outside the encoder layers below the top modules, or
    adapted layers that are not one contiguous top block (`lora.targets` without `{layer}`, say)."""
    split = partial_tower(model, tower)
    names = _tower_lora_names(model, tower)
    total = len(split.layer_list(model.base))
    below_layers = [n for n in names if any(n.startswith(e + ".") for e in split.embeddings)]
    layers = sorted({i for i in map(split.layer_index, names) if i is not None})
    reasons = [f"LoRA on {n}, below the encoder layers" for n in below_layers[:3]]
    if not layers:
        reasons.append(f"no encoder layer of the {tower} tower carries LoRA")
    elif layers != list(range(layers[0], total)):
        reasons.append(f"LoRA on layers {layers} of {total}: not a contiguous top block (`model.{tower}.lora.layers`)")
    elif layers[0] == 0:
        reasons.append(f"LoRA starts at layer 0 of the {tower} tower: nothing below it to cache")
    return reasons


def tower_modules(model, tower: str) -> list[nn.Module]:
    return [model.base.get_submodule(name) for name in model.family.tower_modules[tower]]


def cached_modules(model, tower: str, below_layer: int | None = None) -> list[nn.Module]:
    """What a cache's contents depend on: the whole tower, or (`below_layer=k`) its embeddings and layers < k."""
    if below_layer is None:
        return tower_modules(model, tower)
    return partial_tower(model, tower).below_modules(model.base, below_layer)


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
              quantization=None, weights_sha256: str | None = None, below_layer: int | None = None) -> str:
    """Everything the tower's outputs depend on, hashed (see the module docstring). `weights_sha256`: the
    `tower_weights_sha256` of `cached_modules(model, tower, below_layer)`, when the caller already has it (several
    splits of one run share it). `below_layer=k`: the key of the hidden states entering layer k (`StateCache`),
    which hashes only the embeddings and layers below k: LoRA above them trains without changing the key."""
    modules = cached_modules(model, tower, below_layer)
    dtypes = sorted({str(p.dtype) for m in modules for p in m.parameters()})
    encode = model.family.encode_text if tower == "text" else model.family.encode_image
    if below_layer is not None:
        encode = partial_tower(model, tower).below
    settings = {
        "format": CACHE_FORMAT, "family": model.family.name, "tower": tower, "pooling": encode.__qualname__,
        "weights": weights_sha256 or tower_weights_sha256(modules), "dtypes": dtypes,
        "quantization": repr(quantization),
        "autocast": mixed_precision, "device": torch.device(device).type, "inputs": inputs_sha256(dataset, tower),
        "attention": sorted({str(m.config._attn_implementation) for m in transformers_models(model.base)}),
        "examples": len(dataset),
    }
    if below_layer is not None:
        settings.update(below_layer=below_layer, layers=len(partial_tower(model, tower).layer_list(
            model.base)))
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
        if is_complete(self.folder):
            self.pooled, _ = read_complete(self.folder)
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
        if write_complete(self.folder, "pooled", self.pooled, {}):
            logger.info("feature cache %s complete: %d examples", self.folder, self.size)
