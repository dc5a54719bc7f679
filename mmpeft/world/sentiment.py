"""Multimodal sentiment in the world: positive / neutral / negative, as in MVSA, where neither modality suffices.

The image carries a polarity in its faces and its sky: smiling faces under the sun (+), neutral faces under
clouds (0), frowning faces in the rain (-). The text is a short post with its own polarity (an opinion phrase)
and a description of the faces that never names their expression or the sky. The label follows one rule over
both (`label_for`):

* the image is not neutral -> the image's polarity. When the text agrees, both decided; when the text is neutral
  or says the opposite (sarcasm: "what a wonderful day" under frowning faces in the rain), the image decided;
* the image is neutral -> the text's polarity (the text decided; both when the text is neutral too).

Image polarities are drawn 45 % neutral, 27.5 % each way, text polarities uniformly, so an image-only model
tops out near 70 % accuracy and a text-only one near 63 %; reading both gets 100 %.

Training posts are written with half of each polarity's opinion phrases, validation and test posts with the
other half (`PHRASES`), as a deployed model meets people who put things their own way. A model can only read
those posts if it knows what their words mean before fine-tuning: pretraining taught the text tower every
phrase (`scenes.pretraining_pair`), random initialisation did not.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .files import already_written, mark_written, write_manifest
from .scenes import (
    MOOD_OF_WEATHER,
    OPINIONS,
    POLARITY_OF_EXPRESSION,
    Scene,
    render,
    sample_scene,
    scene_rng,
)

LABELS = ("positive", "neutral", "negative")
EXPRESSION_OF_POLARITY = {v: k for k, v in POLARITY_OF_EXPRESSION.items()}
IMAGE_POLARITY_WEIGHTS = {"positive": 0.275, "neutral": 0.45, "negative": 0.275}
POST_TEMPLATES = ("{opinion}! {description}", "{description}. {opinion}", "{opinion}: {description}",
                   "{opinion}")
DESCRIPTIONS = ("{things} {where}", "{things}", "{things} in this one")
WHERE = {"left": "on the left", "center": "in the middle", "right": "on the right"}
# The image's polarity shows twice: in the faces and in the sky (smiling under the sun, frowning in the rain).
WEATHER_OF_POLARITY = {v: k for k, v in MOOD_OF_WEATHER.items()}
SPLIT_SIZES = {"train": 1200, "val": 300, "test": 600}
PHRASES = {split: {polarity: phrases[:4] if split == "train" else phrases[4:] for polarity, phrases in OPINIONS.items()}
           for split in SPLIT_SIZES}


def label_for(text_polarity: str, image_polarity: str) -> tuple[str, str]:
    """(label, which modality decided it: 'both' | 'image' | 'text') by the rule in the module docstring."""
    if image_polarity != "neutral":
        return image_polarity, "both" if text_polarity == image_polarity else "image"
    return text_polarity, "both" if text_polarity == "neutral" else "text"


@dataclass(frozen=True)
class SentimentExample:
    scene: Scene
    text: str
    text_polarity: str
    image_polarity: str
    label: str
    decided_by: str


def _post(scene: Scene, phrases: tuple[str, ...], rng: random.Random) -> str:
    things = scene.things(rng).replace(f"{scene.expression} ", "")  # the text never names expression or sky
    description = rng.choice(DESCRIPTIONS).format(things=things, where=WHERE[scene.position])
    return rng.choice(POST_TEMPLATES).format(opinion=rng.choice(phrases), description=description)


def sentiment_example(seed: int, split: str, index: int) -> SentimentExample:
    """Example `index` of `split`: a pure function of its arguments (splits draw from disjoint streams)."""
    rng = scene_rng(seed, index, f"sentiment-{split}")
    image_polarity = rng.choices(list(IMAGE_POLARITY_WEIGHTS), weights=list(IMAGE_POLARITY_WEIGHTS.values()))[0]
    text_polarity = rng.choice(LABELS)
    scene = sample_scene(rng, held_out=None, shape="face", expression=EXPRESSION_OF_POLARITY[image_polarity])
    scene = dataclasses.replace(scene, weather=WEATHER_OF_POLARITY[image_polarity])
    label, decided_by = label_for(text_polarity, image_polarity)
    text = _post(scene, PHRASES[split][text_polarity], rng)
    return SentimentExample(scene, text, text_polarity, image_polarity, label, decided_by)


def write_sentiment(out_dir: str | os.PathLike, *, seed: int = 0, sizes: dict[str, int] | None = None,
                    image_size: int = 64) -> dict[str, Path]:
    """Write `images/*.jpg` and `train.jsonl`, `val.jsonl`, `test.jsonl` into out_dir; return the manifests.

    Each JSONL row is what a user's own data looks like (`image`, `text`, `label`) plus this world's
    provenance (`decided_by`, the two polarities, the scene). An existing complete set with the same
    arguments is reused; a different or incomplete one is rewritten.
    """
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    if set(sizes) != set(SPLIT_SIZES) or any(not isinstance(n, int) or n < 3 for n in sizes.values()):
        raise ConfigError(f"sizes must give train, val and test at least 3 examples each; got {sizes}")
    out = Path(out_dir)
    paths = {split: out / f"{split}.jsonl" for split in sizes}
    args = {"format": 3, "seed": seed, "sizes": sizes, "image_size": image_size}
    if already_written(out, paths, args):
        return paths
    for split, n in sizes.items():
        rows = []
        for i in range(n):
            ex = sentiment_example(seed, split, i)
            rel = f"images/{split}_{i:05d}.jpg"
            render(ex.scene, image_size).save(out / rel, format="JPEG", quality=95)
            rows.append({
                "image": rel, "text": ex.text, "label": ex.label, "decided_by": ex.decided_by,
                "text_polarity": ex.text_polarity, "image_polarity": ex.image_polarity,
                "scene": {"colour": ex.scene.colour, "count": ex.scene.count, "position": ex.scene.position,
                          "weather": ex.scene.weather, "expression": ex.scene.expression},
            })
        write_manifest(paths[split], rows)
    mark_written(out, args)
    return paths
