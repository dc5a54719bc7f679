"""The transformers families: CLIP, SigLIP and BLIP (image-text retrieval checkpoints)."""

from __future__ import annotations

import torch
from torch import nn

from .registry import BackboneFamily, TowerOutput, register_backbone

_ATTN = r"self_attn\.(q|k|v|out)_proj"


def _layers(config, tower: str) -> int:
    return getattr(config, f"{tower}_config").num_hidden_layers


def _max_positions(config) -> int:
    return config.text_config.max_position_embeddings


# --- CLIP: pools text at the first EOS under a causal mask, so right padding leaves it exact.
def _clip_text(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
    out = model.text_model(input_ids=input_ids, attention_mask=attention_mask)
    return TowerOutput(model.text_projection(out.pooler_output), out.last_hidden_state, attention_mask)


def _clip_image(model: nn.Module, pixel_values: torch.Tensor) -> TowerOutput:
    out = model.vision_model(pixel_values=pixel_values)
    return TowerOutput(model.visual_projection(out.pooler_output), out.last_hidden_state, None)


CLIP = register_backbone(BackboneFamily(
    name="clip",
    model_types=("clip",),
    model_class=lambda: __import__("transformers").CLIPModel,
    tower_modules={"text": ("text_model", "text_projection"), "vision": ("vision_model", "visual_projection")},
    lora_targets={
        "text": r"text_model\.encoder\.layers\.{layer}\." + _ATTN,
        "vision": r"vision_model\.encoder\.layers\.{layer}\." + _ATTN,
    },
    num_layers=_layers,
    embed_dims=lambda c: {"text": c.projection_dim, "vision": c.projection_dim,
                          "text_tokens": c.text_config.hidden_size, "vision_tokens": c.vision_config.hidden_size},
    encode_text=_clip_text,
    encode_image=_clip_image,
    text_padding="longest",
    max_text_length=_max_positions,
    # benchmarks/quant_skips.py (ViT-B/16 shapes, nf4, 1 - cosine of the pooled embeddings): text_projection alone
    # costs 4.2e-3 for 0.21 % of the linear weights, visual_projection 4.0e-3 for 0.32 %; the whole vision
    # encoder 3.2e-3 for 69 %. No residual path dilutes a projection's error: bf16 there costs 1.2 MB. Whole model
    # in nf4: vision 7.7e-3 -> 3.1e-3 and text 4.0e-2 -> 3.7e-2 with this list.
    quant_skip=(r"text_projection", r"visual_projection"),
    description="transformers CLIPModel",
    example="openai/clip-vit-base-patch16",
))


# --- SigLIP: pools the text's last position, so text is always padded to the same length.
def _siglip_text(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
    # SigLIP was trained without a text attention mask (pad tokens are attended); passing one changes the embedding.
    out = model.text_model(input_ids=input_ids)
    return TowerOutput(out.pooler_output, out.last_hidden_state, attention_mask)


def _siglip_image(model: nn.Module, pixel_values: torch.Tensor) -> TowerOutput:
    out = model.vision_model(pixel_values=pixel_values)
    return TowerOutput(out.pooler_output, out.last_hidden_state, None)


SIGLIP = register_backbone(BackboneFamily(
    name="siglip",
    model_types=("siglip",),
    model_class=lambda: __import__("transformers").SiglipModel,
    tower_modules={"text": ("text_model",), "vision": ("vision_model",)},
    # Anchored to the encoder: a bare `out_proj` suffix would also hit the pooling head's nn.MultiheadAttention.
    lora_targets={
        "text": r"text_model\.encoder\.layers\.{layer}\." + _ATTN,
        "vision": r"vision_model\.encoder\.layers\.{layer}\." + _ATTN,
    },
    num_layers=_layers,
    embed_dims=lambda c: {"text": c.text_config.projection_size, "vision": c.vision_config.hidden_size,
                          "text_tokens": c.text_config.hidden_size, "vision_tokens": c.vision_config.hidden_size},
    encode_text=_siglip_text,
    encode_image=_siglip_image,
    text_padding="max_length",
    max_text_length=_max_positions,
    # benchmarks/quant_skips.py (base shapes, nf4): the text head (its projection) costs 4.2e-3 for 0.34 % of the
    # weights, 15x the text encoder's damage per weight; the vision pooling head's MLP (3.2e-3 for 2.7 %) is no
    # worse per weight than the encoder's attention, so it is quantized. The pooling head's nn.MultiheadAttention
    # reads `out_proj.weight` directly and fails on packed 4-bit weights (ANCHORS §3), whatever the quality.
    # Whole model in nf4: text 4.2e-2 -> 3.8e-2 with this list.
    quant_skip=(r"text_model\.head", r"vision_model\.head\.attention"),
    description="transformers SiglipModel",
    example="google/siglip-base-patch16-224",
))


# --- BLIP retrieval checkpoints: embeddings are vision_proj(vision CLS) and text_proj(text CLS).
def _blip_text(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
    out = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
    return TowerOutput(model.text_proj(out.last_hidden_state[:, 0]), out.last_hidden_state, attention_mask)


def _blip_image(model: nn.Module, pixel_values: torch.Tensor) -> TowerOutput:
    out = model.vision_model(pixel_values=pixel_values)
    return TowerOutput(model.vision_proj(out.last_hidden_state[:, 0]), out.last_hidden_state, None)


BLIP = register_backbone(BackboneFamily(
    name="blip",
    model_types=("blip",),
    # BlipModel would silently re-initialise the text tower of the blip-itm-* checkpoints.
    model_class=lambda: __import__("transformers").BlipForImageTextRetrieval,
    tower_modules={"text": ("text_encoder", "text_proj"), "vision": ("vision_model", "vision_proj")},
    lora_targets={
        "text": r"text_encoder\.encoder\.layer\.{layer}\.attention\.(self\.(query|key|value)|output\.dense)",
        "vision": r"vision_model\.encoder\.layers\.{layer}\.self_attn\.(qkv|projection)",
    },
    num_layers=_layers,
    embed_dims=lambda c: {"text": c.image_text_hidden_size, "vision": c.image_text_hidden_size,
                          "text_tokens": c.text_config.hidden_size, "vision_tokens": c.vision_config.hidden_size},
    encode_text=_blip_text,
    encode_image=_blip_image,
    text_padding="longest",
    max_text_length=_max_positions,
    # Cross-attention only runs when text attends to an image (the ITM head): never for embeddings.
    unused_in_full=r"text_encoder\.encoder\.layer\.\d+\.crossattention\..*",
    # benchmarks/quant_skips.py (base shapes, nf4): text_proj and vision_proj cost 4.5e-3 and 4.0e-3 for 0.10 % of
    # the weights each (whole model: text 2.0e-2 -> 1.5e-2 with this list). The unused cross-attention layers are
    # quantized: 14 % of the weights at no cost to the embeddings.
    quant_skip=(r"text_proj", r"vision_proj"),
    description="transformers BlipForImageTextRetrieval (blip-itm-* checkpoints)",
    example="Salesforce/blip-itm-base-coco",
))
