"""Image-caption retrieval in the world: each scene with one catalogue-style caption of every attribute.

The captions use a terse register pretraining never used ("2x smiling red face | left | rain"), the way a
product catalogue or a photo archive labels images: a shift that fine-tuning has to bridge.

Training pairs never show a held-out colour-shape pair (`HELD_OUT`); validation and test pairs may (about one
scene in six), so recall on them, zero-shot and after fine-tuning, says something about generalisation.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from ..errors import ConfigError
from .files import already_written, mark_written, write_manifest
from .scenes import Scene, render, sample_scene, scene_rng

SPLIT_SIZES = {"train": 1024, "val": 256, "test": 512}
_WEATHER_NOUNS = {"sunny": "sun", "cloudy": "clouds", "rainy": "rain", "snowy": "snow", "night": "night"}


def catalogue_caption(scene: Scene, rng: random.Random) -> str:
    """'2x smiling red face | left | rain', its fields in an order drawn per caption."""
    thing = " ".join([f"{scene.count}x", *([scene.expression] if scene.expression else []), scene.colour,
                      scene.shape])
    fields = [scene.position, _WEATHER_NOUNS[scene.weather]]
    rng.shuffle(fields)
    return rng.choice((" | ", "; ", " / ")).join([thing, *fields])


def retrieval_pair(seed: int, split: str, index: int) -> tuple[Scene, str]:
    """Pair `index` of `split`: a pure function of its arguments (splits draw from disjoint streams)."""
    rng = scene_rng(seed, index, f"retrieval-{split}")
    scene = sample_scene(rng, held_out=False if split == "train" else None)
    return scene, catalogue_caption(scene, rng)


def write_retrieval(out_dir: str | os.PathLike, *, seed: int = 0, sizes: dict[str, int] | None = None,
                    image_size: int = 64) -> dict[str, Path]:
    """Write `images/*.jpg` and `train.jsonl`, `val.jsonl`, `test.jsonl` into out_dir; return the manifests.

    Each JSONL row is what a user's own caption data looks like (`image`, `text`; no label) plus this world's
    provenance (`held_out`, the scene). An existing complete set with the same arguments is reused; a different
    or incomplete one is rewritten.
    """
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    if set(sizes) != set(SPLIT_SIZES) or any(not isinstance(n, int) or n < 3 for n in sizes.values()):
        raise ConfigError(f"sizes must give train, val and test at least 3 examples each; got {sizes}")
    out = Path(out_dir)
    paths = {split: out / f"{split}.jsonl" for split in sizes}
    args = {"format": 2, "task": "retrieval", "seed": seed, "sizes": sizes, "image_size": image_size}
    if already_written(out, paths, args):
        return paths
    for split, n in sizes.items():
        rows = []
        for i in range(n):
            scene, text = retrieval_pair(seed, split, i)
            rel = f"images/{split}_{i:05d}.jpg"
            render(scene, image_size).save(out / rel, format="JPEG", quality=95)
            rows.append({
                "image": rel, "text": text, "held_out": scene.held_out,
                "scene": {"colour": scene.colour, "shape": scene.shape, "count": scene.count,
                          "position": scene.position, "weather": scene.weather, "expression": scene.expression},
            })
        write_manifest(paths[split], rows)
    mark_written(out, args)
    return paths
