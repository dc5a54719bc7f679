"""Overfitting 16 examples end to end through `train()`, and checking that frozen base weights never move."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import FAMILIES

from mmpeft import get_family, load_config, train

train_module = importlib.import_module("mmpeft.training.tasks")  # where the task builds its classifier

FAST = ["train.mixed_precision=no", "train.progress=false", "train.tracker=null", "data.num_workers=0"]
OVERFIT = ["train.lr_lora=5e-3", "train.lr_head=1e-2", "train.epochs=10", "data.batch_size=8",
           "train.warmup_ratio=0", "head.type=concat", "head.hidden=0", "train.metric_for_best=loss"]




@pytest.fixture
def captured(monkeypatch):
    """The FusionClassifier `train()` builds (and trains in place), for inspection after it returns."""
    built = []
    original = train_module.build_classifier

    def build(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_module, "build_classifier", build)
    return built


def run(path, out, manifest, *extra):
    cfg = load_config(None, [f"model.name={path}", f"train.output_dir={out}", f"data.train={manifest}",
                             f"data.eval={manifest}", *FAST, *OVERFIT, *extra])
    return train(cfg)


def original_state(family: str, path) -> dict[str, torch.Tensor]:
    return get_family(family).model_class().from_pretrained(path, dtype=torch.float32).state_dict()


def split_base_state(model) -> tuple[dict, dict, dict]:
    """The peft-wrapped transformers model's state as (frozen base tensors, LoRA tensors, trained full-tower
    copies), each keyed by the original checkpoint name (peft's `base_layer` / `original_module` /
    `modules_to_save.default` infixes removed)."""
    base, lora, full = {}, {}, {}
    for name, tensor in model.base.state_dict().items():
        if "lora_" in name:
            lora[name] = tensor
        elif ".modules_to_save.default." in name:
            full[name.replace(".modules_to_save.default", "")] = tensor
        else:
            base[name.replace(".base_layer", "").replace(".original_module", "")] = tensor
    return base, lora, full


def assert_kept_fitting(results: dict) -> None:
    """Past 100% accuracy the loss keeps falling, and the kept checkpoint is the lowest-loss one."""
    losses = [h["loss"] for h in results["history"]]
    assert len(losses) == 10 and results["steps"] == 20
    assert results["eval"]["loss"] == min(losses) < losses[0]
    assert results["best_step"] == results["history"][losses.index(min(losses))]["step"]


def assert_bit_identical(base: dict, original: dict) -> None:
    assert set(base) == set(original), set(base) ^ set(original)
    moved = [name for name, tensor in base.items() if not torch.equal(tensor, original[name])]
    assert not moved, f"frozen base weights changed: {moved[:10]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_both_towers_overfits_and_keeps_base_weights(family, tiny_paths, sixteen_examples, tmp_path, captured):
    results = run(tiny_paths[family], tmp_path / "out", sixteen_examples)

    assert results["eval"]["accuracy"] == 1.0
    assert results["eval"]["num_samples"] == 16
    assert_kept_fitting(results)
    model = captured[-1]
    base, lora, full = split_base_state(model)
    assert not full
    assert_bit_identical(base, original_state(family, tiny_paths[family]))
    # The adapter did train, in both towers: LoRA B starts at zero and must have moved.
    family_spec = get_family(family)
    for tower in ("text", "vision"):
        b_weights = [t for n, t in lora.items() if "lora_B" in n and family_spec.tower_of(n) == tower]
        assert b_weights and all(t.abs().sum() > 0 for t in b_weights), tower
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)


def test_full_text_tower_frozen_vision(tiny_paths, sixteen_examples, tmp_path, captured):
    results = run(tiny_paths["clip"], tmp_path / "out", sixteen_examples,
                  "model.text.mode=full", "model.vision.mode=frozen", "train.lr_full=1e-3")

    assert results["eval"]["accuracy"] == 1.0
    assert_kept_fitting(results)
    model = captured[-1]
    original = original_state("clip", tiny_paths["clip"])
    base, lora, full = split_base_state(model)
    assert not lora
    family = get_family("clip")
    # Vision tower (and everything outside the text tower) bit-identical; peft's kept original text copy too.
    assert_bit_identical(base, original)
    vision = [n for n in base if family.tower_of(n) == "vision"]
    assert vision and all(torch.equal(base[n], original[n]) for n in vision)
    # The trained text tower covers the whole tower and did change.
    assert set(full) == {n for n in original if family.tower_of(n) == "text"}
    changed = [n for n, t in full.items() if not torch.equal(t, original[n])]
    assert len(changed) > len(full) // 2, changed
    assert any(".self_attn.q_proj.weight" in n for n in changed)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_model" in n)
