"""Image and text augmentation whose randomness is keyed by (seed, epoch, example), not by worker or process.

Keying it this way makes a run reproducible whatever `num_workers` is, and lets a resumed run draw the
same crops and flips as the run it continues.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
from PIL import Image

from ..errors import ConfigError


@dataclass(frozen=True)
class ImageAugment:
    """Random resized crop (to the input size), horizontal flip and colour jitter."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    flip: bool = True
    color_jitter: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"`data.augment.crop_scale` must satisfy 0 < low <= high <= 1, got {self.crop_scale}.")
        if not 0 <= self.color_jitter < 1:
            raise ConfigError(f"`data.augment.color_jitter` must be in [0, 1), got {self.color_jitter}.")

    def __call__(self, image: Image.Image, *, epoch: int, index: int) -> Image.Image:
        from torchvision.transforms import v2

        steps = [v2.RandomResizedCrop((image.height, image.width), scale=tuple(self.crop_scale), antialias=True)]
        if self.flip:
            steps.append(v2.RandomHorizontalFlip())
        if self.color_jitter:
            j = self.color_jitter
            steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
        # torchvision draws from the global RNG: fork it so the caller's stream (dropout, workers) is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            return v2.Compose(steps)(image)


@dataclass(frozen=True)
class TextAugment:
    """Word dropout and synonym swap on a caption.

    Each word is dropped with probability `word_dropout` (never every word) and, if it has synonyms in
    `synonyms` (groups of interchangeable words; default: the world's, `mmpeft.world.vocab.SYNONYMS`),
    replaced by another word of its group with probability `synonym_swap`. Punctuation is kept.
    """

    word_dropout: float = 0.0
    synonym_swap: float = 0.0
    seed: int = 0
    synonyms: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        for name in ("word_dropout", "synonym_swap"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"`data.augment.{name}` must be in [0, 1), got {getattr(self, name)}.")

    @property
    def active(self) -> bool:
        return self.word_dropout > 0 or self.synonym_swap > 0

    def __call__(self, text: str, *, epoch: int, index: int) -> str:
        rng = random.Random(f"{self.seed}:{epoch}:{index}:text")
        groups = _synonym_index(self.synonyms)
        tokens = re.findall(r"\w+|[^\w\s]", text)
        words = [i for i, t in enumerate(tokens) if t[0].isalnum() or t[0] == "_"]
        dropped = {i for i in words if rng.random() < self.word_dropout}
        if words and len(dropped) == len(words):  # keep at least one word
            dropped.discard(rng.choice(words))
        out = []
        for i, token in enumerate(tokens):
            if i in dropped:
                continue
            group = groups.get(token.lower())
            if group and rng.random() < self.synonym_swap:
                token = rng.choice([w for w in group if w != token.lower()] or [token])
            out.append(token)
        return re.sub(r"\s+([^\w\s])", r"\1", " ".join(out))


@lru_cache(maxsize=8)
def _synonym_index(groups: tuple[tuple[str, ...], ...] | None) -> dict[str, tuple[str, ...]]:
    """word -> its synonym group, built once per group set (not once per caption)."""
    if groups is None:
        from ..world.vocab import SYNONYMS

        groups = SYNONYMS
    return {word: group for group in groups for word in group}
