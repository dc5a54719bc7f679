"""The configs (shapes only) of common checkpoints, written out so benchmarks and `mmpeft plan` work offline.

Memory and speed do not depend on the weights' values: a model built from one of these configs with random
weights costs what the real checkpoint costs.
"""

from __future__ import annotations

from ..errors import BackboneError

_CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
_CLIP_B_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, hidden_act="quick_gelu")

KNOWN_SHAPES: dict[str, dict] = {
    "openai/clip-vit-base-patch16": dict(
        model_type="clip", projection_dim=512, text_config=_CLIP_TEXT, vision_config=dict(_CLIP_B_VISION, patch_size=16)),
    "openai/clip-vit-base-patch32": dict(
        model_type="clip", projection_dim=512, text_config=_CLIP_TEXT, vision_config=dict(_CLIP_B_VISION, patch_size=32)),
    "openai/clip-vit-large-patch14": dict(
        model_type="clip", projection_dim=768,
        text_config=dict(_CLIP_TEXT, hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="quick_gelu")),
    "google/siglip-base-patch16-224": dict(
        model_type="siglip",
        text_config=dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=64),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16)),
    "Salesforce/blip-itm-base-coco": dict(
        model_type="blip", projection_dim=512, image_text_hidden_size=256,
        text_config=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=512),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=384, patch_size=16)),
}


def known_config(name: str):
    """The transformers config of a checkpoint listed in `KNOWN_SHAPES`, built without the Hub."""
    from transformers import BlipConfig, CLIPConfig, SiglipConfig

    if name not in KNOWN_SHAPES:
        raise BackboneError(f"No shapes recorded for {name!r}; known: {sorted(KNOWN_SHAPES)}. Pass a local folder "
                         "or a Hub id whose config is in the local cache instead.")
    spec = dict(KNOWN_SHAPES[name])
    cls = {"clip": CLIPConfig, "siglip": SiglipConfig, "blip": BlipConfig}[spec.pop("model_type")]
    return cls(**spec)
