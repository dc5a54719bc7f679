"""benchmarks/minilm_transfer.py --curve: the aspect task's captions and the configurations of its curve."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from mmpeft.compare.runner import plan_configs
from mmpeft.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("minilm_transfer", ROOT / "benchmarks" / "minilm_transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _polarity_of(word: str, words: dict[str, list[str]]) -> str:
    return next(label for label, listed in words.items() if word in listed)


def test_aspect_captions_hold_one_word_of_each_polarity_and_the_label_is_the_foods(bench):
    """Every caption names the food and one other aspect with opposite verdicts, in either order: the words alone
    (a bag of words, a mean of word vectors) say nothing about the label."""
    rng = random.Random(0)
    orders = set()
    for i in range(200):
        label = ("positive", "negative")[i % 2]
        caption = bench.aspect_caption(label, bench.HELD_OUT_WORDS, rng)
        words = caption.replace(",", "").split()
        judged = [w for w in words if any(w in listed for listed in bench.HELD_OUT_WORDS.values())]
        assert sorted(_polarity_of(w, bench.HELD_OUT_WORDS) for w in judged) == ["negative", "positive"], caption
        food = words.index(bench.ASPECT_TARGET)
        verdict = words[food + 2]  # "the food was <word>"
        assert _polarity_of(verdict, bench.HELD_OUT_WORDS) == label, caption
        orders.add(food < len(words) // 2)
    assert orders == {True, False}  # the food comes first and second


def test_aspect_split_labels_are_balanced(bench, tmp_path):
    import json

    path = bench.write_split(tmp_path, "train", 32, bench.TRAIN_WORDS, random.Random(1), bench.aspect_caption)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["label"] for r in rows].count("positive") == 16 and (tmp_path / rows[0]["image"]).is_file()
    assert all(not set(r["text"].split()) & set(bench.HELD_OUT_WORDS["positive"]) for r in rows)


def test_curve_configurations_are_valid_overrides(bench, tmp_path):
    """Probe / LoRA / full of the text tower, each also from the random twin; every one a config that loads."""
    configs = bench.curve_configs(str(tmp_path / "twin"), "torchvision:resnet18@w.safetensors,image_size=32")
    assert list(configs) == ["linear_probe", "lora_text", "full_text", "random_linear_probe", "random_lora_text",
                             "random_full_text"]
    for name, overrides in configs.items():
        cfg = load_config(None, [*overrides, *bench.CURVE_STEPS])
        assert cfg.train.max_steps == 120
        assert cfg.model.text.mode == {"linear": "frozen", "lora": "lora", "full": "full"}[
            name.removeprefix("random_").split("_")[0]]
        assert ("twin" in cfg.model.name) == name.startswith("random_")
    assert list(plan_configs("sentiment", ["lora_text"], configs)) == ["lora_text"]
