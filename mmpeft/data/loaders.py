"""From a `DataConfig` and a loaded backbone to DataLoaders: read, check, tokenise, batch."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from torch.utils.data import DataLoader

from ..errors import ConfigError
from .augment import ImageAugment, TextAugment
from .dataset import Collator, MultimodalDataset, class_counts, encode_texts, label_names_from
from .manifest import Split, read_split

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval", "test")


@dataclass
class DataBundle:
    """The loaders of each split present, the label set (from the training split) and what was dropped or cut."""

    loaders: dict[str, DataLoader]
    label_names: list[str]
    class_counts: list[int]
    report: dict = field(default_factory=dict)


def embedded_manifests(task: str = "classification") -> dict[str, str]:
    """The world's sentiment task (`mmpeft.world.sentiment`), or for `task=retrieval` its image-caption pairs
    (`mmpeft.world.retrieval`), written once into the mmpeft cache."""
    from ..backbones.embedded import cache_dir

    if task == "retrieval":
        from ..world.retrieval import write_retrieval

        paths = write_retrieval(cache_dir() / "world-retrieval-v2", seed=0)
    else:
        from ..world.sentiment import write_sentiment

        paths = write_sentiment(cache_dir() / "world-sentiment-v1", seed=0)
    return {"train": str(paths["train"]), "eval": str(paths["val"]), "test": str(paths["test"])}


def manifest_paths(data_cfg, task: str = "classification") -> dict[str, str]:
    """The configured manifests, or the task's embedded set when no training manifest is given."""
    if data_cfg.train is None:
        return embedded_manifests(task)
    return {name: getattr(data_cfg, name) for name in SPLITS if getattr(data_cfg, name)}


def _read(path: str, data_cfg, *, label_names: list[str] | None, require_labels: bool,
          require_text: bool = True) -> Split:
    return read_split(path, image_column=data_cfg.image_column, text_column=data_cfg.text_column,
                      label_column=data_cfg.label_column, require_labels=require_labels, label_names=label_names,
                      check_images=data_cfg.check_images, skip_bad_rows=data_cfg.skip_bad_rows,
                      allow_outside_root=data_cfg.allow_outside_root, require_text=require_text,
                      normalize_labels=data_cfg.normalize_labels)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def worker_count(requested: int | None) -> int:
    """`data.num_workers`: None picks from the machine; a number is capped at the cores left beside the main
    process (said once per process).

    More workers than cores only adds process start-up and contention (torch warns about it). When fewer than two
    cores are left, loading in the main process is faster than one worker competing with it (issue 13 measured on 2
    cores: 6.5 samples/s with none, 5.5 with two, ViT-B/32 shapes). Picked: none up to 2 cores, else half the cores (the
    other half runs the step's own threads), at most 8.
    """
    cores = available_cores()
    if requested is None:
        return 0 if cores <= 2 else min(8, cores // 2)
    spare = cores - 1
    if requested <= spare:
        return requested
    capped = spare if spare >= 2 else 0
    if (requested, capped) not in _CAPPED:
        _CAPPED.add((requested, capped))
        logger.warning("data.num_workers=%d but this process has %d CPU core(s): using %d loader worker(s)%s.",
                       requested, spare + 1, capped, " (images decoded in the main process)" if not capped else "")
    return capped


_CAPPED: set[tuple[int, int]] = set()


class _Tokenize:
    """One caption to token ids, truncated like the pre-tokenised ones (picklable for loader workers)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, text: str) -> list[int]:
        return list(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])


def make_loader(split: Split, label_names: list[str] | None, backbone, data_cfg, *, train: bool,
                seed: int = 0) -> tuple[DataLoader, int]:
    """One split as a DataLoader padded by the family's policy; also returns how many texts were truncated."""
    import torch

    max_length = data_cfg.max_text_length or backbone.max_text_length
    text = encode_texts(backbone.tokenizer, [ex.text for ex in split.examples], max_length=max_length)
    aug = data_cfg.augment
    augment = (ImageAugment(tuple(aug.crop_scale), aug.flip, aug.color_jitter, seed=seed)
               if train and aug.enabled else None)
    augment_text = TextAugment(aug.word_dropout, aug.synonym_swap, seed=seed) if train else None
    tokenize = None
    if augment_text is not None and augment_text.active:
        tokenize = _Tokenize(backbone.tokenizer, max_length)
    else:
        augment_text = None
    dataset = MultimodalDataset(split, label_names, backbone.image_processor, text, augment=augment,
                                augment_text=augment_text, tokenize=tokenize)
    collate = Collator(backbone.tokenizer.pad_token_id, backbone.text_padding, max_length)
    batch_size = data_cfg.batch_size if train else (data_cfg.eval_batch_size or data_cfg.batch_size)
    workers = worker_count(data_cfg.num_workers)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=train, collate_fn=collate, num_workers=workers,
        # Training workers restart each epoch so they see the dataset's epoch (augmentation depends on it).
        persistent_workers=workers > 0 and not train, drop_last=False,
        # An own generator keeps worker seeding from drawing on the global RNG that dropout uses.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, text.truncated


def build_dataloaders(data_cfg, backbone, *, seed: int = 0, label_names: list[str] | None = None,
                      splits: tuple[str, ...] = SPLITS, require_text: bool = True,
                      task: str = "classification") -> DataBundle:
    """Read every configured split, take the label set from `train` (or `label_names`), build the loaders.

    `require_text=False` when the head never reads captions: manifests may then lack the text column.
    `task="retrieval"` reads image-caption pairs: labels are neither needed nor used (`label_names` stays empty).
    """
    labelled = task == "classification"
    paths = manifest_paths(data_cfg, task)
    if "train" in splits and "train" not in paths:
        raise ConfigError("`data.train` is required for training.")
    read = {}
    if "train" in splits:
        read["train"] = _read(paths["train"], data_cfg, label_names=None, require_labels=labelled,
                              require_text=require_text)
        label_names = (label_names or label_names_from(read["train"])) if labelled else None
    for name in splits:
        if name != "train" and name in paths:
            read[name] = _read(paths[name], data_cfg, label_names=label_names, require_labels=labelled,
                               require_text=require_text)
    loaders, report = {}, {}
    for name, split in read.items():
        loaders[name], truncated = make_loader(split, label_names, backbone, data_cfg, train=name == "train",
                                               seed=seed)
        report[name] = {"manifest": split.source, "examples": len(split.examples), "truncated_texts": truncated,
                        "skipped_rows": [{"row": r, "reason": why} for r, why in split.skipped]}
        if split.skipped:
            logger.warning("%s: skipped %d bad row(s): %s", split.source, len(split.skipped),
                           ", ".join(str(r) for r, _ in split.skipped[:20]))
        if truncated:
            logger.warning("%s: %d of %d texts were longer than %d tokens and were truncated.", split.source,
                           truncated, len(split.examples), data_cfg.max_text_length or backbone.max_text_length)
    counts = class_counts(read["train"], label_names) if "train" in read and labelled else []
    return DataBundle(loaders, list(label_names or []), counts, report)

