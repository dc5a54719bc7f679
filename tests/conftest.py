"""Shared fixtures: tiny checkpoints saved once per session and loaded like a user's local folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mmpeft.backbones.tiny import build_tiny_backbone

FAMILIES = ("clip", "siglip", "blip")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Built backbones and generated data go to a per-session cache, never the user's home."""
    os.environ["MMPEFT_CACHE"] = str(tmp_path_factory.mktemp("mmpeft-cache"))


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    """family -> folder of a tiny randomly initialised checkpoint (seed 0)."""
    return {f: build_tiny_backbone(f, tmp_path_factory.mktemp(f"tiny-{f}"), seed=0) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_clip_other_seed(tmp_path_factory) -> Path:
    """Same config as tiny CLIP, other weights: an adapter trained on one must not load onto the other."""
    return build_tiny_backbone("clip", tmp_path_factory.mktemp("tiny-clip-seed1"), seed=1)


def write_manifest(folder: Path, rows: list[dict], name: str = "train.jsonl") -> Path:
    """Writes `rows` as JSONL; each row's `color` (RGB tuple) becomes a 32 px PNG referenced by `image`."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        row = dict(row)
        color = tuple(row.pop("color", (i * 37 % 256, i * 91 % 256, i * 53 % 256)))
        image = f"img_{name.split('.')[0]}_{i}.png"
        Image.new("RGB", (32, 32), color).save(folder / image)
        lines.append(json.dumps({"image": image, **row}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def sixteen_examples(tmp_path) -> Path:
    """16 image+text examples over 2 labels; image colour and words both carry the label."""
    rows = []
    for i in range(16):
        label = ("cat", "dog")[i % 2]
        shade = 40 + 10 * i
        color = (220, shade, 30) if label == "cat" else (30, shade, 220)
        rows.append({"text": f"a photo of a {label} number {i}", "label": label, "color": color})
    return write_manifest(tmp_path / "data", rows)
