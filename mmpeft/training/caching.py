"""The loop's side of the frozen-tower feature cache (`models/feature_cache.py`): which towers of which split are
cached, and switching the model to the split being run.

`train.feature_cache=memory` (the default) keeps a frozen tower's pooled outputs in this process for as long as the
run lasts; `disk` memory-maps them under `train.feature_cache_dir` (or `$MMPEFT_CACHE`, or `~/.cache/mmpeft`) in
`features/<key>/`, so a later process with the same weights, settings and inputs (the comparison runs each
configuration in its own) reads them instead of running the tower; `off` never caches. Where a tower cannot be
cached (it trains, carries LoRA, sees augmentation, the head reads tokens, several processes), the run says why,
once, and the metrics record it. A cached vision tower of a split no longer needs its images: once its cache is
complete the dataset stops decoding them (training loaders restart their workers each epoch and pick that up).

A LoRA tower whose lowest adapted layer k is above layer 0 (`lora.layers=N` with N below the layer count) gets a
`StateCache` of the states entering layer k, in memory or on disk the same way, for every split when nothing
below k is random in train mode, for evaluation only when dropout there is (`_partial_blockers`); families
without a split forward (models/partial_towers.py) say so.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..backbones.embedded import cache_dir
from ..backbones.registry import TOWERS
from ..models.classifier import FusionClassifier
from ..models.feature_cache import (
    FeatureCache,
    cache_blockers,
    cache_key,
    cached_modules,
    first_adapted_layer,
    partial_cache_blockers,
    tower_weights_sha256,
)
from ..models.partial_towers import partial_tower
from ..models.state_cache import StateCache

SPLITS = ("train", "eval", "test")


def cache_root(directory: str | None) -> Path:
    """Where `disk` caches live: `train.feature_cache_dir`, else `$MMPEFT_CACHE`, else `~/.cache/mmpeft`."""
    return (Path(directory).expanduser() if directory else cache_dir()) / "features"


def plan_feature_caches(run) -> tuple[dict[str, dict], dict[str, str]]:
    """({split: {tower: FeatureCache or StateCache}}, {tower: what happens to it}) for a prepared run."""
    cfg, accelerator = run.cfg, run.accelerator
    mode = cfg.train.feature_cache
    model = accelerator.unwrap_model(run.model)
    if mode == "off":
        return {}, dict.fromkeys(TOWERS, "not cached (train.feature_cache=off)")
    if not isinstance(model, FusionClassifier):
        return {}, dict.fromkeys(TOWERS, f"not cached (the {run.task.name} task encodes every batch anew)")
    was_training = model.training
    caches: dict[str, dict] = {}
    said: dict[str, str] = {}
    for tower in TOWERS:
        if not (model.head.uses_image if tower == "vision" else model.head.uses_text):
            said[tower] = "not cached: the head reads no per-example output of it"
            continue
        below = _last_layers_split(run, model, tower)
        always, blockers = (_partial_blockers if below is not None else _frozen_blockers)(run, model, tower)
        if always:
            said[tower] = "not cached: " + "; ".join(always)
            continue
        splits = [s for s in SPLITS if run.loaders.get(s) is not None and (s != "train" or not blockers)]
        # disk keys hash every weight the cache depends on: once per tower, not once per split
        weights = tower_weights_sha256(cached_modules(model, tower, below)) if mode == "disk" else None
        for split in splits:
            caches.setdefault(split, {})[tower] = _cache(run, model, tower, split, weights, below)
        where = "in memory" if mode == "memory" else f"on disk under {cache_root(cfg.train.feature_cache_dir)}"
        what = "" if below is None else f": the hidden states entering layer {below}, the first with LoRA"
        said[tower] = (f"cached {where} ({', '.join(splits)}){what}"
                       + (f"; not for train: {'; '.join(blockers)}" if blockers else ""))
    model.train(was_training)
    return caches, said


def _last_layers_split(run, model, tower: str) -> int | None:
    """Where a LoRA tower splits: its lowest adapted layer, where that is above layer 0 (`lora.layers=N` below the
    layer count, or `lora.targets` that leave the lower layers alone); in a family without a split forward, layer
    L-N for `lora.layers=N`. None: a frozen tower, or LoRA from layer 0, is the whole-tower cache's case."""
    settings = getattr(run.cfg.model, tower)
    if settings.mode != "lora":
        return None
    if partial_tower(model, tower) is not None:
        return first_adapted_layer(model, tower) or None
    total = model.family.num_layers(model.base.config, tower)
    layers = settings.lora.layers
    return total - layers if layers is not None and layers < total else None


def _augmented(run, tower: str) -> bool:
    augment = run.cfg.data.augment
    return bool(augment.enabled if tower == "vision" else (augment.word_dropout or augment.synonym_swap))


def _frozen_blockers(run, model, tower: str) -> tuple[list[str], list[str]]:
    """(what stops the whole-tower cache for every split, what stops it for training only: augmentation)."""
    model.train()  # what the towers are during training: dropout and BatchNorm in the mode they train in
    always = cache_blockers(model, tower, head_reads_tokens=run.cfg.head.type == "cross_attention",
                            num_processes=run.accelerator.num_processes)
    return always, cache_blockers(model, tower, augment=_augmented(run, tower))


def _partial_blockers(run, model, tower: str) -> tuple[list[str], list[str]]:
    """As `_frozen_blockers`, for the states below the first LoRA layer: dropout and BatchNorm there stop only
    the training split's cache (evaluation runs in eval mode, where they are deterministic)."""
    model.eval()
    always = partial_cache_blockers(model, tower, num_processes=run.accelerator.num_processes)
    model.train()
    return always, partial_cache_blockers(model, tower, augment=_augmented(run, tower))


def _cache(run, model, tower: str, split: str, weights: str | None, below: int | None):
    """In memory (`weights` None: one process, one run, nothing can change what is cached, no key needed), or on
    disk under the full key. `below`: a `StateCache` of the states entering that layer, else a `FeatureCache`."""
    dataset = run.loaders[split].dataset
    root, key = None, f"memory-{split}-{tower}"
    if weights is not None:
        cfg, backbone = run.cfg, run.backbone
        key = cache_key(model, tower, dataset, mixed_precision=run.accelerator.mixed_precision,
                        device=run.accelerator.device,
                        text_length=cfg.data.max_text_length or backbone.max_text_length,
                        padding=backbone.text_padding, image_processor=backbone.image_processor,
                        quantization=cfg.model.quantization, weights_sha256=weights, below_layer=below)
        root = cache_root(cfg.train.feature_cache_dir)
    if below is None:
        return FeatureCache(key, len(dataset), root=root)
    return StateCache(key, len(dataset), partial_tower(model, tower), below, root=root)


@contextlib.contextmanager
def caches_for(run, split: str):
    """The model reads (and fills) `split`'s caches inside this block; what it read before, after it. Once a
    split's vision cache is complete, its dataset stops decoding images."""
    model = run.accelerator.unwrap_model(run.model)
    before, caches = model.feature_caches, run.feature_caches.get(split)
    model.feature_caches = caches
    try:
        yield
    finally:
        model.feature_caches = before
        stop_decoding_cached_images(run, split)


def stop_decoding_cached_images(run, split: str) -> None:
    """Once `split`'s vision features are all cached, its dataset no longer decodes images (loader workers started
    before this keep decoding: results are the same either way)."""
    caches = run.feature_caches.get(split) or {}
    if "vision" in caches and caches["vision"].complete:
        run.loaders[split].dataset.load_images = False


def describe_caches(run) -> list[str]:
    """The lines a run prints about the cache: for every tower that is cached, or frozen or LoRA on its last layers
    and not cached (why)."""
    model = run.accelerator.unwrap_model(run.model)
    return [f"{tower} tower: {what}" for tower, what in run.cache_report.items()
            if what.startswith("cached") or model.tower_modes.get(tower) == "frozen"
            or _last_layers_split(run, model, tower) is not None]
