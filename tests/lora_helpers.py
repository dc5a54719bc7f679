"""What the adapter and head tests share: tiny configs, batches, one training step, gradient checks and the
LoRA module sets each family should get."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmpeft.backbones import get_family, load_backbone
from mmpeft.config import load_config
from mmpeft.data import Collator, encode_texts
from mmpeft.models.classifier import build_classifier

FAMILIES = ("clip", "siglip", "blip")
LABELS = ["negative", "positive"]
TEXTS = ["a happy dog", "a sad cat sitting in the rain on a cold grey day"]
TOWER_COMBOS = [
    ("frozen", "frozen"),
    ("lora", "lora"),
    ("full", "full"),
    ("lora", "full"),
    ("frozen", "lora"),
]
# Parameters outside both towers: no tower mode may ever train them.
NON_TOWER = {"clip": {"logit_scale"}, "siglip": {"logit_scale", "logit_bias"},
             "blip": {"itm_head.weight", "itm_head.bias"}}



# --- helpers --------------------------------------------------------------------------------------------------


def make_config(text="lora", vision="lora", head="concat", head_mode="full", *extra):
    return load_config(None, [f"model.text.mode={text}", f"model.vision.mode={vision}", f"head.type={head}",
                              f"head.mode={head_mode}", "model.text.lora.dropout=0.0",
                              "model.vision.lora.dropout=0.0", *extra])


def make_classifier(path, cfg, labels=LABELS):
    """A fresh backbone per classifier: peft injects its layers into the loaded model."""
    backbone = load_backbone(str(path))
    return backbone, build_classifier(backbone, cfg, labels)


def make_batch(backbone, texts=TEXTS):
    """Two examples: pixels from the image processor, tokens encoded and padded the family's way."""
    max_length = backbone.max_text_length
    encoded = encode_texts(backbone.tokenizer, texts, max_length=max_length)
    images = [Image.new("RGB", (48, 40), (40 + 150 * i, 120, 200 - 90 * i)) for i in range(len(texts))]
    pixels = backbone.image_processor(images=images, return_tensors="pt")["pixel_values"]
    items = [{"input_ids": ids, "pixel_values": pixels[i], "labels": i % 2, "index": i}
             for i, ids in enumerate(encoded.input_ids)]
    return Collator(backbone.tokenizer.pad_token_id, backbone.text_padding, max_length)(items)


def plain(name: str) -> str:
    """A classifier parameter's name relative to the unwrapped transformers model (or `head.`...)."""
    return (name.removeprefix("backbone.").removeprefix("base_model.model.")
            .replace(".modules_to_save.default", ""))


def randomize_lora_b(model: nn.Module) -> None:
    """LoRA's B starts at zero, which would leave every A without gradient."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen) + 0.01)


def train_step(model: nn.Module, batch: dict) -> torch.Tensor:
    torch.manual_seed(0)
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(**batch)
    F.cross_entropy(logits, batch["labels"]).backward()
    return logits


def assert_grads(model: nn.Module) -> None:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing trains"
    no_grad = [n for n, p in trainable if p.grad is None]
    zero_grad = [n for n, p in trainable if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not no_grad, f"trainable parameters without a gradient: {no_grad}"
    assert not zero_grad, f"trainable parameters with an all-zero gradient: {zero_grad}"
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad, frozen_with_grad


def lora_num_layers(config, tower: str) -> int:
    return getattr(config, f"{tower}_config").num_hidden_layers


def expected_lora_modules(family: str, config, tower: str, last: int | None = None) -> set[str]:
    """The modules that must carry LoRA, written out by hand per family."""
    n = lora_num_layers(config, tower)
    layers = range(n) if last is None else range(n - last, n)
    if family in ("clip", "siglip"):
        prefix = "text_model" if tower == "text" else "vision_model"
        return {f"{prefix}.encoder.layers.{i}.self_attn.{p}_proj" for i in layers for p in ("q", "k", "v", "out")}
    if tower == "text":
        return {f"text_encoder.encoder.layer.{i}.attention.{m}" for i in layers
                for m in ("self.query", "self.key", "self.value", "output.dense")}
    return {f"vision_model.encoder.layers.{i}.self_attn.{m}" for i in layers for m in ("qkv", "projection")}


def tower_params(family: str, path, tower: str) -> set[str]:
    """Every parameter of one tower in a freshly loaded model, minus those classification never uses."""
    spec = get_family(family)
    model = load_backbone(str(path)).model
    names = {n for n, _ in model.named_parameters() if spec.tower_of(n) == tower}
    if spec.unused_in_full:
        names = {n for n in names if not re.fullmatch(spec.unused_in_full, n)}
    return names


def head_towers(head: str, mode: str = "lora") -> tuple[str, str]:
    """The tower modes for a head: `mode` on the towers it reads, frozen on the one it never runs."""
    return {"text_only": (mode, "frozen"), "image_only": ("frozen", mode)}.get(head, (mode, mode))
