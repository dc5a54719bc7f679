"""Data layer: reading manifests, building torch datasets and loaders, augmentation."""

from mmpeft.data.dataset import Collator, MultimodalDataset, TextEncoding, class_counts, encode_texts, label_names_from
from mmpeft.data.manifest import DataError, Example, Split, read_split

__all__ = [
    "DataError",
    "Example",
    "Split",
    "read_split",
    "label_names_from",
    "class_counts",
    "TextEncoding",
    "encode_texts",
    "MultimodalDataset",
    "Collator",
]
