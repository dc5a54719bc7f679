"""Dual encoders composed from a transformers text encoder and any image encoder, named in one string:

    dual:text=<transformers id or folder>,vision=<image encoder>[,pooling=cls|mean][,image_size=N]

`<image encoder>` is a transformers id or folder (ViT, ConvNeXt, ResNet, DINOv2, ...), `torchvision:<resnet>[@file]`
or `timm:<name>[@file]`; without `@file` a torchvision or timm tower would start from seeded random weights, which
`load_backbone` refuses unless `allow_random_init=True`. `pooling` is
the text pooling: `mean` over real tokens (sentence-transformers checkpoints) or `cls`; by default it is what the
checkpoint's sentence-transformers pooling config says, else `cls`. `image_size` sets the input resolution of a
torchvision (default 224) or timm (default: the model's) tower. The name is what `mmpeft.json` records, so
`load_adapter` rebuilds the same backbone from it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError
from .presets import TEXT_PRESETS, VISION_PRESETS, count_layers, tower_pattern
from .registry import BackboneFamily, TowerOutput, register_backbone
from .vision_towers import (
    load_vision_tower,
    parse_library_spec,
    transformers_encoder_class,
    vision_features,
)
from .weights import check_tokenizer, load_transformers_model

KEYS = ("text", "vision", "pooling", "image_size")
POOLING = ("cls", "mean")
TEXT_PREFIX, VISION_PREFIX = r"text_model\.", r"vision_model\."


@dataclass
class DualConfig:
    """What the towers are and what mmpeft reads about them (peft reads `config` too: keep it a dataclass)."""

    text: str
    vision: str
    pooling: str
    vision_library: str
    embed_dims: dict[str, int] = field(default_factory=dict)
    num_layers: dict[str, int] = field(default_factory=dict)
    max_text_length: int = 512


class DualEncoder(nn.Module):
    """A text encoder and an image encoder side by side; their names are what LoRA targets and peft keys use."""

    def __init__(self, text_model: nn.Module, vision_model: nn.Module, config: DualConfig):
        super().__init__()
        self.text_model = text_model
        self.vision_model = vision_model
        self.config = config


def parse_dual_spec(spec: str) -> dict[str, str | int | None]:
    """`text=...,vision=...[,pooling=...][,image_size=...]` -> a dict; every problem reported at once."""
    fields, problems = {}, []
    for part in re.split(r",(?=[A-Za-z_]+=)", spec):
        key, sep, value = part.partition("=")
        if not sep or key not in KEYS:
            problems.append(f"{part!r} is not one of {', '.join(k + '=...' for k in KEYS)}")
        elif key in fields:
            problems.append(f"{key}= is given twice")
        else:
            fields[key] = value.strip()
    problems += [f"{key}= is missing" for key in ("text", "vision") if not fields.get(key)]
    if fields.get("pooling") not in (None, *POOLING):
        problems.append(f"pooling={fields['pooling']} must be one of {', '.join(POOLING)}")
    size = fields.get("image_size")
    if size is not None and not (size.isdigit() and int(size) >= 8):
        problems.append(f"image_size={size} must be a whole number of pixels >= 8")
    if problems:
        raise BackboneError(f"Dual-encoder name 'dual:{spec}': " + "; ".join(problems) + ". Expected "
                            "dual:text=<transformers id or folder>,vision=<transformers id or folder | "
                            "torchvision:resnet50[@file.safetensors] | timm:<name>[@file]>[,pooling=cls|mean]"
                            "[,image_size=N].")
    return {**fields, "image_size": int(size) if size else None}


def _read_json(location: str, filename: str, revision: str | None) -> dict:
    from transformers.utils import cached_file

    path = cached_file(location, filename, revision=revision, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    return json.loads(Path(path).read_text()) if path else {}


def _text_tower(location: str, torch_dtype: torch.dtype, revision: str | None, trust_pickle_weights: bool):
    """A transformers text encoder with its tokenizer, its default pooling and its usable length."""
    from transformers import AutoTokenizer

    location, config, model_class = transformers_encoder_class(location, revision, "input_ids", "text",
                                                               "BERT, RoBERTa, DeBERTa, MiniLM, ...")
    model, info = load_transformers_model(model_class, location, revision, torch_dtype, trust_pickle_weights,
                                          "text_model.")
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    check_tokenizer(tokenizer, config.vocab_size, location, need_pad=True, where="text=")
    pooling = _read_json(location, "1_Pooling/config.json", revision)
    default_pooling = "mean" if pooling.get("pooling_mode_mean_tokens") else "cls"
    lengths = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", None),
               _read_json(location, "sentence_bert_config.json", revision).get("max_seq_length")]
    max_length = min(n for n in lengths if isinstance(n, int) and n > 0)
    return model, tokenizer, default_pooling, max_length, config.hidden_size, info


def load_dual(spec: str, *, torch_dtype: torch.dtype, revision: str | None, trust_pickle_weights: bool):
    """The family's loader: both towers, the text tokenizer and the image tower's processor."""
    fields = parse_dual_spec(spec)
    text, tokenizer, default_pooling, max_length, text_width, text_info = _text_tower(
        fields["text"], torch_dtype, revision, trust_pickle_weights)
    vision, processor, vision_width, vision_info = load_vision_tower(
        fields["vision"], image_size=fields["image_size"], torch_dtype=torch_dtype, revision=revision,
        trust_pickle_weights=trust_pickle_weights)
    config = DualConfig(
        text=fields["text"], vision=fields["vision"], pooling=fields.get("pooling") or default_pooling,
        vision_library=parse_library_spec(fields["vision"])[0],
        embed_dims={"text": text_width, "vision": vision_width, "text_tokens": text_width,
                    "vision_tokens": vision_width},
        max_text_length=max_length,
    )
    model = DualEncoder(text, vision, config)
    config.num_layers = {"text": count_layers(model, TEXT_PREFIX, TEXT_PRESETS),
                         "vision": count_layers(model, VISION_PREFIX, VISION_PRESETS)}
    info = {kind: text_info.get(kind, []) + vision_info.get(kind, [])
            for kind in ("missing_keys", "mismatched_keys", "random_init")}
    return model, tokenizer, processor, info


def pool_text(tokens: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> TowerOutput:
    """The text tower's output from its last hidden states: the first token (`cls`) or the mean over real tokens."""
    if pooling == "cls":
        pooled = tokens[:, 0]
    else:  # mean over real tokens: padding never counts
        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1)
    return TowerOutput(pooled, tokens, attention_mask)


def _text(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
    tokens = model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return pool_text(tokens, attention_mask, model.config.pooling)


def _image(model: nn.Module, pixel_values: torch.Tensor) -> TowerOutput:
    pooled, tokens = vision_features(model.vision_model, model.config.vision_library, pixel_values)
    return TowerOutput(pooled, tokens, None)


DUAL = register_backbone(BackboneFamily(
    name="dual",
    model_types=(),
    model_class=lambda: DualEncoder,
    tower_modules={"text": ("text_model",), "vision": ("vision_model",)},
    lora_targets={"text": tower_pattern(TEXT_PREFIX, TEXT_PRESETS),
                  "vision": tower_pattern(VISION_PREFIX, VISION_PRESETS)},
    num_layers=lambda config, tower: config.num_layers[tower],
    embed_dims=lambda config: dict(config.embed_dims),
    encode_text=_text,
    encode_image=_image,
    # CLS and masked-mean pooling under a padding mask: padding to the batch's longest text changes nothing.
    text_padding="longest",
    max_text_length=lambda config: config.max_text_length,
    description="a transformers text encoder + a transformers / torchvision / timm image encoder: "
                "dual:text=<id or folder>,vision=<id, folder, torchvision:<resnet>[@file] or timm:<name>[@file]>",
    example="dual:text=bert-base-uncased,vision=torchvision:resnet50@resnet50.safetensors",
    load=load_dual,
))
