"""From a `DataConfig` and a loaded backbone to DataLoaders: read, check, tokenise, batch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch.utils.data import DataLoader

from .augment import ImageAugment
from .dataset import Collator, MultimodalDataset, class_counts, encode_texts, label_names_from
from .manifest import Split, read_split
from .synthetic import write_synthetic_sentiment

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval", "test")


@dataclass
class DataBundle:
    """The loaders of each split present, the label set (from the training split) and what was dropped or cut."""

    loaders: dict[str, DataLoader]
    label_names: list[str]
    class_counts: list[int]
    report: dict = field(default_factory=dict)


def embedded_manifests() -> dict[str, str]:
    """The generated sentiment set the default run trains on, written once into the mmpeft cache."""
    from ..backbones.embedded import cache_dir

    paths = write_synthetic_sentiment(cache_dir() / "synthetic-sentiment-v1", n_train=480, n_eval=96, n_test=192)
    return {name: str(path) for name, path in paths.items()}


def manifest_paths(data_cfg) -> dict[str, str]:
    """The configured manifests, or the embedded set when no training manifest is given."""
    if data_cfg.train is None:
        return embedded_manifests()
    return {name: getattr(data_cfg, name) for name in SPLITS if getattr(data_cfg, name)}


def _read(path: str, data_cfg, *, label_names: list[str] | None, require_labels: bool) -> Split:
    return read_split(path, image_column=data_cfg.image_column, text_column=data_cfg.text_column,
                      label_column=data_cfg.label_column, require_labels=require_labels, label_names=label_names,
                      check_images=data_cfg.check_images, skip_bad_rows=data_cfg.skip_bad_rows,
                      allow_outside_root=data_cfg.allow_outside_root)


def make_loader(split: Split, label_names: list[str] | None, backbone, data_cfg, *, train: bool,
                seed: int = 0) -> tuple[DataLoader, int]:
    """One split as a DataLoader padded by the family's policy; also returns how many texts were truncated."""
    import torch

    max_length = data_cfg.max_text_length or backbone.max_text_length
    text = encode_texts(backbone.tokenizer, [ex.text for ex in split.examples], max_length=max_length)
    aug = data_cfg.augment
    augment = (ImageAugment(tuple(aug.crop_scale), aug.flip, aug.color_jitter, seed=seed)
               if train and aug.enabled else None)
    dataset = MultimodalDataset(split, label_names, backbone.image_processor, text, augment=augment)
    collate = Collator(backbone.tokenizer.pad_token_id, backbone.text_padding, max_length)
    batch_size = data_cfg.batch_size if train else (data_cfg.eval_batch_size or data_cfg.batch_size)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=train, collate_fn=collate, num_workers=data_cfg.num_workers,
        # Training workers restart each epoch so they see the dataset's epoch (augmentation depends on it).
        persistent_workers=data_cfg.num_workers > 0 and not train, drop_last=False,
        # An own generator keeps worker seeding from drawing on the global RNG that dropout uses.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, text.truncated


def build_dataloaders(data_cfg, backbone, *, seed: int = 0, label_names: list[str] | None = None,
                      splits: tuple[str, ...] = SPLITS) -> DataBundle:
    """Read every configured split, take the label set from `train` (or `label_names`), build the loaders."""
    paths = manifest_paths(data_cfg)
    if "train" in splits and "train" not in paths:
        raise ValueError("`data.train` is required for training.")
    read = {}
    if "train" in splits:
        read["train"] = _read(paths["train"], data_cfg, label_names=None, require_labels=True)
        label_names = label_names or label_names_from(read["train"])
    for name in splits:
        if name != "train" and name in paths:
            read[name] = _read(paths[name], data_cfg, label_names=label_names, require_labels=True)
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
    counts = class_counts(read["train"], label_names) if "train" in read else []
    return DataBundle(loaders, list(label_names or []), counts, report)

