"""A tower split at one encoder layer: what runs below it (cacheable when nothing there trains) and what runs above.

`below(base, k, inputs)` returns the hidden states that enter layer `k`; `above(base, k, states, inputs)` runs
layers `k..L-1`, the final norm, the pooling and the projection from them and returns the `TowerOutput` the
family's `encode_text` / `encode_image` returns. The two halves are the transformers forward cut in two (the same
modules, masks and pooling, in the same order), so `above(below(x))` is the family's function: LoRA on the last
N layers (`model.<tower>.lora.layers=N`) trains from cached states exactly as it trains from the inputs.

Only towers whose transformers forward is spelled out here can be split (`PARTIAL_FAMILIES`: CLIP's two towers,
and a dual encoder's text tower when it is a BERT-style encoder); `split_missing` says why for the others, and the
feature cache (models/feature_cache.py) reports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..backbones.dual import pool_text
from ..backbones.registry import TowerOutput


@dataclass(frozen=True)
class PartialTower:
    """One tower of one family, split at a layer. `layers` is the module path of the encoder's layer list
    (`text_model.encoder.layers`); `embeddings` the modules that run before layer 0."""

    layers: str
    embeddings: tuple[str, ...]
    below: Callable[[nn.Module, int, dict], torch.Tensor]
    above: Callable[[nn.Module, int, torch.Tensor, dict], TowerOutput]
    unfit: Callable[[nn.Module], str | None] = lambda base: None  # why this base's tower is not the one written

    def layer_list(self, base: nn.Module) -> nn.ModuleList:
        return base.get_submodule(self.layers)

    def below_names(self, k: int) -> list[str]:
        """The modules the states entering layer `k` depend on: what the cache key hashes and the blockers read."""
        return [*self.embeddings, *(f"{self.layers}.{i}" for i in range(k))]

    def below_modules(self, base: nn.Module, k: int) -> list[nn.Module]:
        return [base.get_submodule(name) for name in self.below_names(k)]

    def layer_index(self, module_name: str) -> int | None:
        """The encoder layer a module name (relative to the unwrapped model) lies in, or None."""
        match = re.match(re.escape(self.layers) + r"\.(\d+)\.", module_name)
        return int(match.group(1)) if match else None


# --- CLIP (transformers' CLIPTextTransformer / CLIPVisionTransformer in modeling_clip.py) ---------------------------

def _clip_text_mask(text_model: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor):
    """The causal + padding mask CLIPTextModel.forward builds, from transformers' own helper: the attention
    implementation (eager, sdpa, ...) decides its form, and the split forward must give each layer the same one."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=text_model.config, inputs_embeds=states, attention_mask=attention_mask,
                              cache=None)


def _clip_text_below(base: nn.Module, k: int, inputs: dict) -> torch.Tensor:
    text_model = base.text_model
    states = text_model.embeddings(input_ids=inputs["input_ids"])
    mask = _clip_text_mask(text_model, states, inputs["attention_mask"])
    for layer in text_model.encoder.layers[:k]:
        states = layer(states, mask, is_causal=True)
    return states


def _clip_text_above(base: nn.Module, k: int, states: torch.Tensor, inputs: dict) -> TowerOutput:
    """Layers k.., the final norm, pooling at the first EOS token (the legacy argmax when eos_token_id is 2, as
    CLIPTextModel does) and the projection."""
    text_model, input_ids, attention_mask = base.text_model, inputs["input_ids"], inputs["attention_mask"]
    mask = _clip_text_mask(text_model, states, attention_mask)
    for layer in text_model.encoder.layers[k:]:
        states = layer(states, mask, is_causal=True)
    tokens = text_model.final_layer_norm(states)
    ids = input_ids.to(dtype=torch.int, device=tokens.device)
    eos = ids.argmax(dim=-1) if text_model.eos_token_id == 2 else (ids == text_model.eos_token_id).int().argmax(-1)
    pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), eos]
    return TowerOutput(base.text_projection(pooled), tokens, attention_mask)


def _clip_image_below(base: nn.Module, k: int, inputs: dict) -> torch.Tensor:
    vision_model = base.vision_model
    states = vision_model.pre_layrnorm(vision_model.embeddings(inputs["pixel_values"]))
    for layer in vision_model.encoder.layers[:k]:
        states = layer(states, None)
    return states


def _clip_image_above(base: nn.Module, k: int, states: torch.Tensor, inputs: dict) -> TowerOutput:
    """Layers k.., then CLIPVisionModel's pooling: post_layernorm of the class token, and the projection."""
    vision_model = base.vision_model
    for layer in vision_model.encoder.layers[k:]:
        states = layer(states, None)
    pooled = vision_model.post_layernorm(states[:, 0, :])
    return TowerOutput(base.visual_projection(pooled), states, None)


# --- a dual encoder's BERT-style text tower (transformers' BertModel / RobertaModel forward, modeling_bert.py) -------

BERT_STYLE = ("bert", "roberta", "xlm-roberta")  # embeddings, encoder.layer[i](states, mask), a bidirectional mask


def _bert_mask(text_model: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor):
    """The padding mask BertModel.forward builds for an encoder, from transformers' own helper (its form follows the
    attention implementation, as in `_clip_text_mask`)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=text_model.config, inputs_embeds=states, attention_mask=attention_mask)


def _bert_text_below(base: nn.Module, k: int, inputs: dict) -> torch.Tensor:
    text_model = base.text_model
    states = text_model.embeddings(input_ids=inputs["input_ids"])
    mask = _bert_mask(text_model, states, inputs["attention_mask"])
    for layer in text_model.encoder.layer[:k]:
        states = layer(states, mask)
    return states


def _bert_text_above(base: nn.Module, k: int, states: torch.Tensor, inputs: dict) -> TowerOutput:
    """Layers k.., then the dual encoder's pooling of the last hidden states (`cls` or the mean over real tokens)."""
    text_model, attention_mask = base.text_model, inputs["attention_mask"]
    mask = _bert_mask(text_model, states, attention_mask)
    for layer in text_model.encoder.layer[k:]:
        states = layer(states, mask)
    return pool_text(states, attention_mask, base.config.pooling)


def _bert_unfit(base: nn.Module) -> str | None:
    config = base.text_model.config
    if config.model_type not in BERT_STYLE:
        return (f"the text tower is a {config.model_type} encoder; its split forward is written for "
                f"{', '.join(BERT_STYLE)}")
    if config.is_decoder:
        return "the text tower is configured as a decoder (causal mask); its split forward is written for encoders"
    return None


PARTIAL_FAMILIES: dict[str, dict[str, PartialTower]] = {
    "clip": {
        "text": PartialTower("text_model.encoder.layers", ("text_model.embeddings",), _clip_text_below,
                             _clip_text_above),
        "vision": PartialTower("vision_model.encoder.layers", ("vision_model.embeddings", "vision_model.pre_layrnorm"),
                               _clip_image_below, _clip_image_above),
    },
    "dual": {
        "text": PartialTower("text_model.encoder.layer", ("text_model.embeddings",), _bert_text_below,
                             _bert_text_above, unfit=_bert_unfit),
    },
}


def split_missing(model, tower: str) -> str | None:
    """Why `tower` of `model` (a classifier: `.family`, `.base`) has no split forward, or None when it has one."""
    split = PARTIAL_FAMILIES.get(model.family.name, {}).get(tower)
    if split is None:
        written = " and ".join(f"{family}'s {' and '.join(towers)}" for family, towers in PARTIAL_FAMILIES.items())
        return (f"the states below the first adapted layer are cached only for {written} towers, not "
                f"{model.family.name}'s {tower} tower")
    return split.unfit(model.base)


def partial_tower(model, tower: str) -> PartialTower | None:
    """The split forward of `tower` in `model` (a classifier: `.family`, `.base`), or None where none is written."""
    if split_missing(model, tower) is not None:
        return None
    return PARTIAL_FAMILIES[model.family.name][tower]
