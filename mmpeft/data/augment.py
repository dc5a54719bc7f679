"""Image augmentation whose randomness is keyed by (seed, epoch, example), not by worker or process.

Keying it this way makes a run reproducible whatever `num_workers` is, and lets a resumed run draw the
same crops and flips as the run it continues.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


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
            raise ValueError(f"`data.augment.crop_scale` must satisfy 0 < low <= high <= 1, got {self.crop_scale}.")
        if not 0 <= self.color_jitter < 1:
            raise ValueError(f"`data.augment.color_jitter` must be in [0, 1), got {self.color_jitter}.")

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
