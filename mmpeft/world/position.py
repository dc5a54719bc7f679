"""Where are the objects? left / center / right: a label the shipped tiny CLIP never learnt to read.

Pretraining captions name the position ("on the left"), but `tiny-clip-world` matched captions by colour and
sky and ignored it: zero-shot position is at chance (0.33) and so is a probe trained on its frozen embeddings.
The objects are large (one to three in a 21 px column of a 64 px image), so the cue is in every image; only a
vision tower that is adapted can learn to put it into the pooled embedding.

Each example is an image and a caption that names everything in the scene except where the objects are
(`caption_without_position`), so the text carries no label and a model has to read the image. Labels are
balanced in every split; the splits draw from disjoint random streams.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

from ..errors import ConfigError
from .files import already_written, mark_written, write_manifest
from .scenes import POSITIONS, WEATHER_PHRASES, Scene, render, sample_scene, scene_rng

LABELS = POSITIONS
PER_CLASS = {"train": 400, "val": 20, "test": 60}
TEMPLATES = ("a photo of {things} {weather}", "{things} {weather}", "{weather}, {things}",
             "a drawing of {things} {weather}", "a picture of {things}")


def caption_without_position(scene: Scene, rng: random.Random) -> str:
    """A caption of the scene's colour, shape, count and sky that never says where the objects are."""
    return rng.choice(TEMPLATES).format(things=scene.things(rng), weather=rng.choice(WEATHER_PHRASES[scene.weather]))


def position_example(seed: int, split: str, position: str, index: int) -> tuple[Scene, str]:
    """Example `index` of `position` in `split`: a pure function of its arguments."""
    rng = scene_rng(seed, index, f"position-{split}-{position}")
    scene = dataclasses.replace(sample_scene(rng, held_out=None), position=position)
    return scene, caption_without_position(scene, rng)


def write_position(out_dir: str | os.PathLike, *, seed: int = 0, per_class: dict[str, int] | None = None,
                   image_size: int = 64) -> dict[str, Path]:
    """Write `images/*.jpg` and `train.jsonl`, `val.jsonl`, `test.jsonl` (`image`, `text`, `label`, `scene`).

    An existing complete set with the same arguments is reused; a different or incomplete one is rewritten.
    """
    per_class = dict(PER_CLASS if per_class is None else per_class)
    if set(per_class) != set(PER_CLASS) or any(not isinstance(n, int) or n < 1 for n in per_class.values()):
        raise ConfigError(f"per_class must give train, val and test at least 1 example each; got {per_class}")
    out = Path(out_dir)
    paths = {split: out / f"{split}.jsonl" for split in per_class}
    args = {"format": 1, "seed": seed, "per_class": per_class, "image_size": image_size}
    if already_written(out, paths, args):
        return paths
    for split, n in per_class.items():
        rows = []
        for position in LABELS:
            for i in range(n):
                scene, text = position_example(seed, split, position, i)
                rel = f"images/{split}_{position}_{i:04d}.jpg"
                render(scene, image_size).save(out / rel, format="JPEG", quality=95)
                rows.append({"image": rel, "text": text, "label": position,
                             "scene": {"colour": scene.colour, "shape": scene.shape, "count": scene.count,
                                       "weather": scene.weather}})
        random.Random(f"position-order-{seed}-{split}").shuffle(rows)  # labels interleaved, not in blocks
        write_manifest(paths[split], rows)
    mark_written(out, args)
    return paths
