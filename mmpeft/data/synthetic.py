"""A small generated image+text sentiment set whose label needs both modalities (offline, deterministic)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 1
SPLITS = ("train", "eval", "test")
LABELS = ("positive", "neutral", "negative")

POSITIVE_WORDS = ("lovely", "wonderful", "great", "beautiful", "delightful", "cheerful", "fantastic", "pleasant")
NEGATIVE_WORDS = ("awful", "terrible", "gloomy", "miserable", "dreadful", "horrible", "depressing", "bleak")
NOUNS = ("day", "morning", "afternoon", "view", "walk", "weekend", "trip", "moment")
TEMPLATES = ("what a {adj} {noun}", "this is {adj}", "such a {adj} {noun}", "the {noun} feels {adj}",
             "honestly, a {adj} {noun}", "I find this {noun} {adj}", "{adj}, just {adj}", "a truly {adj} {noun}")


def _caption(rng: random.Random, positive: bool) -> str:
    words = POSITIVE_WORDS if positive else NEGATIVE_WORDS
    return rng.choice(TEMPLATES).format(adj=rng.choice(words), noun=rng.choice(NOUNS))


def _image(rng: np.random.Generator, warm: bool, size: int) -> Image.Image:
    """A warm scene (orange/yellow sun on a light background) or a cold one (grey-blue cloud on dark)."""
    jitter = rng.integers(-12, 13, size=3)
    if warm:
        background = np.array([245, 232, 200]) + jitter
        shape = np.array([250, 190, 40]) + rng.integers(-10, 11, size=3)
    else:
        background = np.array([45, 55, 85]) + jitter
        shape = np.array([110, 125, 160]) + rng.integers(-10, 11, size=3)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in np.clip(background, 0, 255)))
    radius = size * rng.uniform(0.18, 0.32)
    cx, cy = rng.uniform(radius, size - radius, size=2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = tuple(int(c) for c in np.clip(shape, 0, 255))
    if warm:
        ImageDraw.Draw(img).ellipse(box, fill=fill)
    else:
        ImageDraw.Draw(img).rounded_rectangle(box, radius=radius / 2, fill=fill)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 6.0, size=(size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")


def _plan(rng: random.Random, n: int) -> list[tuple[bool, bool]]:
    """(image is warm, text is positive) per example, with the three labels as balanced as n allows."""
    cells: list[tuple[bool, bool]] = []
    for i in range(n):
        label = LABELS[i % 3]
        if label == "neutral":
            # Alternate which modality disagrees so neither alone predicts "neutral".
            conflict = (i // 3) % 2 == 0
            cells.append((conflict, not conflict))
        else:
            cells.append((label == "positive",) * 2)
    rng.shuffle(cells)
    return cells


def label_for(warm_image: bool, positive_text: bool) -> str:
    """Both positive -> positive, both negative -> negative, disagreement -> neutral."""
    if warm_image == positive_text:
        return "positive" if warm_image else "negative"
    return "neutral"


def write_synthetic_sentiment(out_dir: str | os.PathLike, *, n_train: int = 192, n_eval: int = 48, n_test: int = 48,
                              image_size: int = 32, seed: int = 0) -> dict[str, Path]:
    """Writes JPEG images and train/eval/test JSONL manifests to out_dir and returns the manifest paths."""
    sizes = {"train": n_train, "eval": n_eval, "test": n_test}
    if min(sizes.values()) < 3:
        raise ValueError(f"every split needs at least 3 examples (one per label); got {sizes}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels; got {image_size}")
    out = Path(out_dir)
    paths = {name: out / f"{name}.jsonl" for name in SPLITS}
    args = {"version": FORMAT_VERSION, **{f"n_{k}": v for k, v in sizes.items()}, "image_size": image_size,
            "seed": seed}
    marker = out / "synthetic.json"
    if marker.exists() and all(p.exists() for p in paths.values()):
        try:
            if json.loads(marker.read_text()) == args:
                return paths
        except json.JSONDecodeError:
            pass  # a damaged marker just means "regenerate"
    marker.unlink(missing_ok=True)  # written last, so an interrupted run is never mistaken for a complete one
    (out / "images").mkdir(parents=True, exist_ok=True)

    text_rng, pixel_rng = random.Random(seed), np.random.default_rng(seed)
    for name in SPLITS:
        lines = []
        for i, (warm, positive) in enumerate(_plan(text_rng, sizes[name])):
            rel = f"images/{name}_{i:05d}.jpg"
            _image(pixel_rng, warm, image_size).save(out / rel, format="JPEG", quality=95)
            record = {"image": rel, "text": _caption(text_rng, positive), "label": label_for(warm, positive),
                      "decided_by": "both" if warm == positive else "conflict"}
            lines.append(json.dumps(record) + "\n")
        with open(paths[name], "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
    marker.write_text(json.dumps(args, indent=2) + "\n")
    return paths
