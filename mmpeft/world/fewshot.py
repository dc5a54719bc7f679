"""Few-shot image classification on one attribute of the world, as in CLIP-LoRA's protocol.

k training images per class drawn by seed from a fixed pool; a fixed validation and test set shared by every
k and seed, so runs differ only in which shots they saw. Class names are the attribute's words, for the
`prompt` head's template ("a photo of a {}.").
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from ..errors import ConfigError
from .files import already_written, mark_written, write_manifest
from .scenes import COLOURS, SHAPES, WEATHERS, render, sample_scene, scene_rng

ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "weather": WEATHERS}
_POOL_PER_CLASS = 64


def _scenes_of(attribute: str, name: str, split: str, n: int, world_seed: int = 0, held_out: bool | None = None):
    fix = {"shape": "shape", "colour": "colour"}.get(attribute)
    scenes = []
    for i in range(n):
        rng = scene_rng(world_seed, i, f"fewshot-{attribute}-{name}-{split}")
        if fix:
            scene = sample_scene(rng, held_out=held_out, **{fix: name})
        else:
            while (scene := sample_scene(rng, held_out=held_out)).weather != name:
                pass
        scenes.append(scene)
    return scenes


def write_fewshot(out_dir: str | os.PathLike, *, attribute: str = "shape", shots: int = 4, seed: int = 0,
                  val_per_class: int = 8, test_per_class: int = 50, image_size: int = 64) -> dict[str, Path]:
    """Write `train.jsonl` (k=`shots` per class, chosen by `seed`), `val.jsonl`, `test.jsonl` and images."""
    if attribute not in ATTRIBUTES:
        raise ConfigError(f"attribute must be one of {list(ATTRIBUTES)}, got {attribute!r}")
    if not 1 <= shots <= _POOL_PER_CLASS:
        raise ConfigError(f"shots must be between 1 and {_POOL_PER_CLASS}, got {shots}")
    out = Path(out_dir)
    args = {"format": 1, "attribute": attribute, "shots": shots, "seed": seed, "val_per_class": val_per_class,
            "test_per_class": test_per_class, "image_size": image_size}
    paths = {split: out / f"{split}.jsonl" for split in ("train", "val", "test")}
    if already_written(out, paths, args):
        return paths
    pick = random.Random(f"fewshot-{seed}")
    for split in paths:
        rows = []
        for name in ATTRIBUTES[attribute]:
            if split == "train":
                pool = _scenes_of(attribute, name, "pool", _POOL_PER_CLASS)
                chosen = pick.sample(range(len(pool)), shots)
                scenes = [(j, pool[j]) for j in chosen]
            else:
                scenes = list(enumerate(_scenes_of(attribute, name, split,
                                                   val_per_class if split == "val" else test_per_class)))
            for j, scene in scenes:
                rel = f"images/{split}_{name}_{j:03d}.jpg"
                render(scene, image_size).save(out / rel, format="JPEG", quality=95)
                rows.append({"image": rel, "label": name})
        write_manifest(paths[split], rows)
    mark_written(out, args)
    return paths


def write_fewshot_shifted(out_dir: str | os.PathLike, *, attribute: str = "shape", per_class: int = 50,
                          image_size: int = 64) -> Path:
    """Write `shifted.jsonl`: a test set with the labels of `write_fewshot`, drawn only from the (colour, shape)
    pairs held out of pretraining (`HELD_OUT`), a distribution shift for robustness (WiSE-FT's sweep)."""
    if attribute not in ATTRIBUTES:
        raise ConfigError(f"attribute must be one of {list(ATTRIBUTES)}, got {attribute!r}")
    out = Path(out_dir)
    args = {"format": 1, "attribute": attribute, "split": "shifted", "per_class": per_class, "image_size": image_size}
    path = out / "shifted.jsonl"
    if already_written(out, {"shifted": path}, args):
        return path
    rows = []
    for name in ATTRIBUTES[attribute]:
        for j, scene in enumerate(_scenes_of(attribute, name, "shifted", per_class, held_out=True)):
            rel = f"images/shifted_{name}_{j:03d}.jpg"
            render(scene, image_size).save(out / rel, format="JPEG", quality=95)
            rows.append({"image": rel, "label": name})
    write_manifest(path, rows)
    mark_written(out, args)
    return path
