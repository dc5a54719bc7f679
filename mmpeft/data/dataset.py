"""Torch dataset, batch collation and the text padding policy for image+text examples."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from mmpeft.data.manifest import DataError, Split, decode_image, label_variants, raise_problems, where

logger = logging.getLogger(__name__)

PADDING_POLICIES = ("longest", "max_length")


def label_names_from(split: Split) -> list[str]:
    """Sorted unique labels of the training split; a classifier needs at least two.

    Labels that differ only by case or surrounding spaces are separate classes: each such group is warned about
    (`read_split(..., normalize_labels=True)` merges them).
    """
    variants = label_variants(split.examples)
    if variants:
        groups = "; ".join(", ".join(f"{s!r} ({n} rows)" for s, n in sorted(spellings.items()))
                           for spellings in variants.values())
        logger.warning("%s: %d label(s) are spelled several ways and each spelling becomes its own class: %s. "
                       "Fix the manifest, or set data.normalize_labels=true to merge them.", split.source,
                       len(variants), groups)
    names = sorted({ex.label for ex in split.examples if ex.label is not None})
    if len(names) < 2:
        found = f"only the label '{names[0]}'" if names else "no labels"
        raise DataError(f"{split.source}: training data has {found}; expected at least 2 classes")
    return names


def class_counts(split: Split, label_names: list[str]) -> list[int]:
    """Number of examples per class, in label_names order."""
    counts = Counter(ex.label for ex in split.examples)
    return [counts.get(name, 0) for name in label_names]


@dataclass
class TextEncoding:
    """Token ids of every caption, unpadded, plus how many captions were cut to fit."""

    input_ids: list[list[int]]
    truncated: int


def encode_texts(tokenizer: Any, texts: list[str], *, max_length: int) -> TextEncoding:
    """Tokenizes all captions in one batched call, truncating to max_length and counting exactly what was cut."""
    texts = list(texts)
    kept = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    # A second pass without truncation is the only count that is exact for every tokenizer family;
    # verbose=False silences the "longer than model_max_length" warning this pass would trigger.
    full = tokenizer(texts, truncation=False, padding=False, verbose=False)["input_ids"]
    truncated = sum(len(a) != len(b) for a, b in zip(kept, full))
    return TextEncoding([list(ids) for ids in kept], truncated)


class MultimodalDataset(torch.utils.data.Dataset):
    """Examples of one split as model inputs; images are decoded lazily in the loading worker."""

    def __init__(self, split: Split, label_names: list[str] | None, image_processor: Any, text: TextEncoding,
                 augment: Callable[..., Image.Image] | None = None,
                 augment_text: Callable[..., str] | None = None, tokenize: Callable[[str], list[int]] | None = None):
        """`augment_text` rewrites a caption per (epoch, index) and `tokenize` encodes the result (both or neither)."""
        if (augment_text is None) != (tokenize is None):
            raise ValueError("augment_text needs tokenize to encode the rewritten caption (give both or neither)")
        if len(text.input_ids) != len(split.examples):
            raise ValueError(f"{len(text.input_ids)} encoded texts for {len(split.examples)} examples")
        self.examples = split.examples
        self.image_processor = image_processor
        self.input_ids = text.input_ids
        self.augment = augment
        self.augment_text, self.tokenize = augment_text, tokenize
        self.epoch = 0
        # False once the vision tower's features are all cached (models/feature_cache.py): no decoding at all.
        self.load_images = True
        index = {name: i for i, name in enumerate(label_names or [])}
        if label_names is None:
            self.labels = [-1] * len(self.examples)
        else:
            raise_problems([f"{ex.source} row {ex.row}: unknown label '{ex.label}'; expected one of "
                            f"{', '.join(label_names)}" for ex in self.examples
                            if ex.label is not None and ex.label not in index], f"{split.source}: unknown labels")
            self.labels = [-1 if ex.label is None else index[ex.label] for ex in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def load_image(self, i: int) -> Image.Image:
        """Decodes example i as RGB, turning any decode failure into a DataError naming file and row."""
        ex = self.examples[i]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = decode_image(ex)
            return img.convert("RGB")
        except Exception as e:  # a file changed or skipped by check_images=False must still fail clearly
            raise DataError(f"{ex.source} row {ex.row}: cannot decode image {where(ex)} "
                            f"({type(e).__name__}: {e}); expected a complete JPEG/PNG/... file") from e

    def set_epoch(self, epoch: int) -> None:
        """Augmentation depends on the epoch; workers see it because they are started anew each epoch."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[i], "labels": self.labels[i], "index": i}
        if self.augment_text is not None:
            item["input_ids"] = self.tokenize(self.augment_text(self.examples[i].text, epoch=self.epoch, index=i))
        if self.load_images:
            image = self.load_image(i)
            if self.augment is not None:
                image = self.augment(image, epoch=self.epoch, index=i)
            item["pixel_values"] = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0].float()
        return item


class Collator:
    """Stacks images and pads token ids by the backbone family's policy."""

    def __init__(self, pad_token_id: int, padding: str, max_length: int):
        if padding not in PADDING_POLICIES:
            raise ValueError(f"padding must be one of {', '.join(PADDING_POLICIES)}; got {padding!r}")
        self.pad_token_id = pad_token_id
        self.padding = padding
        self.max_length = max_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(item["input_ids"]) for item in items]
        if max(lengths) > self.max_length:
            raise ValueError(f"a sequence of {max(lengths)} tokens exceeds max_length={self.max_length}; "
                             "encode texts with encode_texts(..., max_length) first")
        # Some text towers (e.g. SigLIP) were trained on fixed-length inputs and need "max_length".
        width = self.max_length if self.padding == "max_length" else max(lengths)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.tensor([item["labels"] for item in items], dtype=torch.long),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        }
        if "pixel_values" in items[0]:  # absent when the dataset's images are cached features
            batch["pixel_values"] = torch.stack([item["pixel_values"] for item in items]).float()
        return batch
