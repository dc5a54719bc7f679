"""Heads and head modes on every family: what each head trains, LoRA on a head, the prompt head as zero-shot CLIP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import (FAMILIES, assert_grads, head_towers, make_batch, make_classifier, make_config,
                          randomize_lora_b, train_step)
from peft.tuners.lora import LoraLayer
from torch import nn

from mmpeft.backbones import load_backbone
from mmpeft.config import HEAD_TYPES, load_config

# --- heads ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
@pytest.mark.parametrize("head", HEAD_TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_head_on_every_family(tiny_paths, family, head, mode):
    text_mode, vision_mode = head_towers(head, mode)
    labels = ["cat", "dog", "bird"]
    backbone, model = make_classifier(tiny_paths[family], make_config(text_mode, vision_mode, head), labels)
    assert any(p.requires_grad for p in model.head.parameters())
    randomize_lora_b(model)
    batch = make_batch(backbone)
    batch["labels"] = torch.tensor([0, 2])
    logits = train_step(model, batch)
    assert logits.shape == (2, len(labels))
    assert torch.isfinite(logits).all()
    assert_grads(model)


@pytest.mark.parametrize("head,unused", [("text_only", "vision"), ("image_only", "text")])
def test_unimodal_head_needs_unused_tower_frozen(head, unused):
    used = "vision" if unused == "text" else "text"
    for mode in ("lora", "full"):
        with pytest.raises(ValueError) as err:
            load_config(None, [f"head.type={head}", f"model.{unused}.mode={mode}", f"model.{used}.mode=lora"])
        message = str(err.value)
        assert f"`head.type={head}` never runs the {unused} tower" in message
        assert f"set `model.{unused}.mode=frozen` (it is `{mode}`)" in message
    load_config(None, [f"head.type={head}", f"model.{unused}.mode=frozen"])  # accepted


@pytest.mark.parametrize("head", HEAD_TYPES)
def test_frozen_head_trains_nothing_in_the_head(tiny_paths, head):
    backbone, model = make_classifier(tiny_paths["clip"], make_config(*head_towers(head), head, "frozen"))
    assert not any(p.requires_grad for p in model.head.parameters())
    randomize_lora_b(model)
    train_step(model, make_batch(backbone))
    assert_grads(model)  # the tower adapters still learn
    assert all(p.grad is None for p in model.head.parameters())


@pytest.mark.parametrize("head", [h for h in HEAD_TYPES if h != "prompt"])
@pytest.mark.parametrize("family", ["clip", "blip"])
def test_lora_head_trains_only_its_adapters(tiny_paths, family, head):
    backbone, model = make_classifier(tiny_paths[family], make_config(*head_towers(head), head, "lora"))
    head_trainable = [n for n, p in model.head.named_parameters() if p.requires_grad]
    assert head_trainable and all("lora_" in n for n in head_trainable)
    # Every nn.Linear of the head got an adapter: the only plain Linears left are LoRA's own and wrapped bases.
    bare = [n for n, m in model.head.named_modules() if type(m) is nn.Linear
            and ".lora_" not in n and not n.endswith("base_layer")]
    assert not bare
    assert sum(isinstance(m, LoraLayer) for m in model.head.modules()) >= 2
    randomize_lora_b(model)
    train_step(model, make_batch(backbone))
    assert_grads(model)
    assert all(p.grad is None for n, p in model.head.named_parameters() if "lora_" not in n)


def test_prompt_head_rejects_lora_mode():
    with pytest.raises(ValueError, match="`head.type=prompt` has no linear layers for LoRA"):
        load_config(None, ["head.type=prompt", "head.mode=lora"])


def test_prompt_head_starts_as_zero_shot_clip(tiny_paths):
    labels = ["cat", "dog", "bird", "red car"]
    cfg = make_config("frozen", "frozen", "prompt", "full", "head.prompt_template=a picture of a {}.")
    backbone, model = make_classifier(tiny_paths["clip"], cfg, labels)
    assert model.head.class_embeds is not None and model.head.class_embeds.requires_grad
    batch = make_batch(backbone)
    model.eval()
    with torch.no_grad():
        logits = model(**batch)

        clip = load_backbone(str(tiny_paths["clip"])).model
        prompts = backbone.tokenizer([f"a picture of a {c}." for c in labels], padding=True, return_tensors="pt")
        text = clip.get_text_features(**prompts)
        image = clip.get_image_features(pixel_values=batch["pixel_values"])
        text = getattr(text, "pooler_output", text)
        image = getattr(image, "pooler_output", image)
        expected = clip.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    assert logits.shape == (2, len(labels))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_prompt_head_with_lora_text_reencodes_classes(tiny_paths):
    cfg = make_config("lora", "frozen", "prompt")
    backbone, model = make_classifier(tiny_paths["clip"], cfg, ["cat", "dog", "bird"])
    assert model.head.class_embeds is None
    assert [n for n, _ in model.head.named_parameters()] == ["logit_scale"]
    batch = make_batch(backbone)
    model.eval()
    with torch.no_grad():
        before = model(**batch)
        # The batch's captions play no part: the class prompts are what the text tower encodes.
        other = dict(batch, input_ids=torch.flip(batch["input_ids"], [0]))
        torch.testing.assert_close(model(**other), before)
        for name, param in model.named_parameters():
            if "lora_B" in name and name.count("text_model"):
                param.normal_()
        after = model(**batch)
    assert not torch.allclose(before, after)


