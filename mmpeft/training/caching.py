"""The loop's side of the frozen-tower feature cache (`models/feature_cache.py`): which towers of which split are
cached, and switching the model to the split being run.

`train.feature_cache=memory` (the default) keeps a frozen tower's pooled outputs in this process for as long as the
run lasts; `disk` memory-maps them under `train.feature_cache_dir` (or `$MMPEFT_CACHE`, or `~/.cache/mmpeft`) in
`features/<key>/`, so a later process with the same weights, settings and inputs (the comparison runs each
configuration in its own) reads them instead of running the tower; `off` never caches. Where a tower cannot be
cached (it trains, carries LoRA, sees augmentation, the head reads tokens, several processes), the run says why,
once, and the metrics record it. A cached vision tower of a split no longer needs its images: once its cache is
complete the dataset stops decoding them (training loaders restart their workers each epoch and pick that up).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..backbones.embedded import cache_dir
from ..backbones.registry import TOWERS
from ..models.classifier import FusionClassifier
from ..models.feature_cache import FeatureCache, cache_blockers, cache_key, tower_modules, tower_weights_sha256

SPLITS = ("train", "eval", "test")


def cache_root(directory: str | None) -> Path:
    """Where `disk` caches live: `train.feature_cache_dir`, else `$MMPEFT_CACHE`, else `~/.cache/mmpeft`."""
    return (Path(directory).expanduser() if directory else cache_dir()) / "features"


def plan_feature_caches(run) -> tuple[dict[str, dict[str, FeatureCache]], dict[str, str]]:
    """({split: {tower: FeatureCache}}, {tower: what happens to it}) for a prepared run."""
    cfg, accelerator = run.cfg, run.accelerator
    mode = cfg.train.feature_cache
    model = accelerator.unwrap_model(run.model)
    if mode == "off":
        return {}, dict.fromkeys(TOWERS, "not cached (train.feature_cache=off)")
    if not isinstance(model, FusionClassifier):
        return {}, dict.fromkeys(TOWERS, f"not cached (the {run.task.name} task encodes every batch anew)")
    was_training = model.training
    model.train()  # what the towers are during training: dropout and BatchNorm in the mode they train in
    augment = cfg.data.augment
    reads_tokens = cfg.head.type == "cross_attention"
    caches: dict[str, dict[str, FeatureCache]] = {}
    said: dict[str, str] = {}
    for tower in TOWERS:
        if not (model.head.uses_image if tower == "vision" else model.head.uses_text):
            said[tower] = "not cached: the head reads no per-example output of it"
            continue
        augmented = bool(augment.enabled if tower == "vision" else (augment.word_dropout or augment.synonym_swap))
        always = cache_blockers(model, tower, head_reads_tokens=reads_tokens, num_processes=accelerator.num_processes)
        if always:
            said[tower] = "not cached: " + "; ".join(always)
            continue
        blockers = cache_blockers(model, tower, augment=augmented)  # training only; evaluation sees no augmentation
        splits = [s for s in SPLITS if run.loaders.get(s) is not None and (s != "train" or not blockers)]
        # disk keys hash every weight of the tower: once per tower, not once per split
        weights = tower_weights_sha256(tower_modules(model, tower)) if mode == "disk" else None
        for split in splits:
            caches.setdefault(split, {})[tower] = _cache(run, model, tower, split, weights)
        where = "in memory" if mode == "memory" else f"on disk under {cache_root(cfg.train.feature_cache_dir)}"
        said[tower] = (f"cached {where} ({', '.join(splits)})"
                       + (f"; not for train: {'; '.join(blockers)}" if blockers else ""))
    model.train(was_training)
    return caches, said


def _cache(run, model, tower: str, split: str, weights: str | None) -> FeatureCache:
    """In memory (`weights` None: one process, one run, nothing can change the frozen tower, no key needed), or on
    disk under the full key."""
    dataset = run.loaders[split].dataset
    if weights is None:
        return FeatureCache(f"memory-{split}-{tower}", len(dataset))
    cfg, backbone = run.cfg, run.backbone
    key = cache_key(model, tower, dataset, mixed_precision=run.accelerator.mixed_precision,
                    device=run.accelerator.device, text_length=cfg.data.max_text_length or backbone.max_text_length,
                    padding=backbone.text_padding, image_processor=backbone.image_processor,
                    quantization=cfg.model.quantization, weights_sha256=weights)
    return FeatureCache(key, len(dataset), root=cache_root(cfg.train.feature_cache_dir))


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
    """The lines a run prints about the cache: for every tower that is cached, or frozen and not cached (why)."""
    model = run.accelerator.unwrap_model(run.model)
    return [f"{tower} tower: {what}" for tower, what in run.cache_report.items()
            if what.startswith("cached") or model.tower_modes.get(tower) == "frozen"]
