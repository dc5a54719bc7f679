"""open_clip backbones: `open_clip:<architecture>[@<pretrained tag or checkpoint file>]`.

The model is built as open_clip's `CustomTextCLIP` (`force_custom_text=True`), whose two towers are the submodules
`text` and `visual`; a checkpoint in the classic CLIP layout is converted by open_clip's own loader. So an adapter
saved here loads with stock peft onto `open_clip.create_model(arch, pretrained=..., force_custom_text=True)`.
`<architecture>` is an open_clip model name or the path of an open_clip model-config JSON file (its stem is the name).
Without `@...` the weights are random, seeded, so that the same name always builds the same backbone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError
from .custom import TransformProcessor, float_dtype, load_into, seeded_init
from .presets import VISION_PRESETS, count_layers, tower_pattern
from .registry import BackboneFamily, TowerOutput, register_backbone
from .tokenizers import CLIP_MERGES, clip_bpe_tokenizer
from .weights import PICKLE_SUFFIXES, check_tokenizer, read_weights

logger = logging.getLogger(__name__)

TEXT_PREFIX, VISION_PREFIX = r"text\.", r"visual\."
# nn.MultiheadAttention: peft puts LoRA on its fused in_proj and its out_proj together.
TEXT_PRESETS = {"open_clip-transformer": r"transformer\.resblocks\.{layer}\.attn"}
OPEN_CLIP_VISION_PRESETS = {
    "open_clip-vit": r"transformer\.resblocks\.{layer}\.attn",
    "open_clip-modified-resnet": VISION_PRESETS["resnet"],  # RN50 & co.: last stage convolutions ...
    "open_clip-attention-pool": r"attnpool\.(q|k|v|c)_proj",  # ... and the attention pool's projections
    **{f"open_clip-{k}": r"trunk\." + v for k, v in VISION_PRESETS.items() if k.startswith("timm")},
}
# Pooling that padding after the text cannot change: argmax finds the first end-of-text token (the highest id).
EXACT_POOLING = ("argmax", "eos", "first")


@dataclass
class OpenClipConfig:
    """What mmpeft reads about a loaded open_clip model (peft reads `config` too: keep it a dataclass)."""

    architecture: str
    embed_dims: dict[str, int] = field(default_factory=dict)
    num_layers: dict[str, int] = field(default_factory=dict)
    max_text_length: int = 77


@lru_cache(maxsize=4)
def clip_tokenizer(context_length: int):
    """open_clip's CLIP BPE tokenizer (shipped in the package) as a transformers tokenizer, ids unchanged."""
    return clip_bpe_tokenizer(CLIP_MERGES, max_length=context_length)


def _architecture(spec: str) -> str:
    """An open_clip model name, or the stem of a model-config JSON file, registered with open_clip first."""
    import open_clip

    if spec.endswith(".json"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BackboneError(f"open_clip model config {path} does not exist.")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(spec) is None:
        raise BackboneError(f"open_clip has no model config {spec!r}. Available: {open_clip.list_models()}; or "
                            "pass the path of a model-config JSON file: `open_clip:/path/to/name.json@weights`.")
    return spec


def _checkpoint(arch: str, source: str, name: str, trust_pickle_weights: bool) -> tuple[str, dict]:
    """The checkpoint file for `source` (a file, or a pretrained tag open_clip downloads) and its preprocessing."""
    import open_clip

    if Path(source).expanduser().is_file() or source.endswith((".safetensors", *PICKLE_SUFFIXES)):
        return source, {}
    tag = open_clip.get_pretrained_cfg(arch, source)
    if not tag:
        raise BackboneError(f"{name!r}: {source!r} is neither a checkpoint file nor an open_clip pretrained tag of "
                            f"{arch}; its tags: {open_clip.list_pretrained_tags_by_model(arch)}.")
    try:
        path = open_clip.download_pretrained(tag)
    except Exception as err:  # offline: huggingface_hub / urllib errors of many kinds
        raise BackboneError(
            f"{name!r}: open_clip could not fetch the pretrained weights for tag {source!r} ({type(err).__name__}: "
            f"{err}). Offline, copy the checkpoint file onto this machine and name it instead: "
            f"`open_clip:{arch}@/path/to/open_clip_model.safetensors`.") from None
    preprocess = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
    return path, {"preprocess": preprocess, "quick_gelu": tag.get("quick_gelu", False)}


def load_open_clip(spec: str, *, torch_dtype: torch.dtype, revision: str | None, trust_pickle_weights: bool):
    """The family's loader: `<arch>[@<tag or file>]` -> (model, tokenizer, image processor, loading info)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    name = f"open_clip:{spec}"
    if revision:
        raise BackboneError(f"{name!r}: `model.revision` applies to Hub checkpoints, not to open_clip names.")
    arch_spec, _, source = spec.partition("@")
    arch = _architecture(arch_spec)
    path, extra = _checkpoint(arch, source, name, trust_pickle_weights) if source else (None, {})
    text_cfg = open_clip.get_model_config(arch)["text_cfg"]
    if "hf_tokenizer_name" in text_cfg or "hf_model_name" in text_cfg:
        raise BackboneError(
            f"{name!r}: this open_clip architecture's tokenizer ({text_cfg.get('hf_tokenizer_name')}) comes from "
            "the Hugging Face Hub (SigLIP and HF-text models); mmpeft supports open_clip models with its shipped "
            "CLIP BPE tokenizer. For SigLIP use the transformers family (`google/siglip-*`).")

    def build() -> nn.Module:
        return open_clip.create_model(arch, pretrained=None, force_custom_text=True, pretrained_text=False,
                                      force_quick_gelu=extra.get("quick_gelu", False),
                                      force_preprocess_cfg=extra.get("preprocess"))

    model = seeded_init(build)
    info = {}
    if path is not None:
        state = read_weights(path, name, trust_pickle_weights)
        state = open_clip.model.convert_to_custom_text_state_dict(state)  # classic CLIP layout -> text.*
        if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        info = load_into(model, state, "")
    else:
        logger.warning("%s: no weights named, so the backbone is randomly initialised (seed 0).", name)
    text = model.text
    if getattr(text, "cls_emb", None) is not None or text.pool_type not in EXACT_POOLING or text.attn_mask is None:
        raise BackboneError(f"{name!r}: mmpeft supports open_clip text towers with a causal mask that pool at the "
                            f"end-of-text token; this one has pool_type={text.pool_type!r} (CoCa or bidirectional).")
    if hasattr(model.visual, "output_tokens"):
        model.visual.output_tokens = True  # a ViT returns (pooled, patch tokens): the cross_attention head reads them
    model.to(torch_dtype)
    tokenizer = clip_tokenizer(text.context_length)
    check_tokenizer(tokenizer, text.vocab_size, name)
    processor = TransformProcessor(image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)),
                                                      is_train=False))
    visual_tokens = getattr(model.visual, "transformer", None)
    embed = open_clip.get_model_config(arch)["embed_dim"]
    model.config = OpenClipConfig(
        architecture=arch,
        embed_dims={"text": embed, "vision": embed, "text_tokens": text.width,
                    "vision_tokens": visual_tokens.width if visual_tokens is not None else embed},
        num_layers={"text": count_layers(model, TEXT_PREFIX, TEXT_PRESETS),
                    "vision": count_layers(model, VISION_PREFIX, OPEN_CLIP_VISION_PRESETS)},
        max_text_length=text.context_length,
    )
    return model, tokenizer, processor, info


def _text(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
    """open_clip's TextTransformer forward with its causal mask cut to the batch's length (it expects exactly
    `context_length` tokens); after the end-of-text token nothing reaches the pooled position, so padding to the
    longest text gives the same embedding as open_clip's fixed 77 tokens."""
    from open_clip.transformer import text_global_pool

    tower = model.text
    length = input_ids.shape[1]
    x = tower.token_embedding(input_ids) + tower.positional_embedding[:length].to(float_dtype(tower))
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    pooled = text_global_pool(x, input_ids, pool_type=tower.pool_type, eos_token_id=getattr(tower, "eos_id", None))
    projection = tower.text_projection
    if projection is not None:
        pooled = projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection
    return TowerOutput(pooled, x, attention_mask)


def _image(model: nn.Module, pixel_values: torch.Tensor) -> TowerOutput:
    out = model.visual(pixel_values.to(float_dtype(model.visual)))
    pooled, tokens = out if isinstance(out, tuple) else (out, out[:, None])  # CNN towers: one "token"
    return TowerOutput(pooled, tokens, None)


OPEN_CLIP = register_backbone(BackboneFamily(
    name="open_clip",
    model_types=(),
    model_class=lambda: __import__("open_clip").CustomTextCLIP,
    tower_modules={"text": ("text",), "vision": ("visual",)},
    lora_targets={"text": tower_pattern(TEXT_PREFIX, TEXT_PRESETS),
                  "vision": tower_pattern(VISION_PREFIX, OPEN_CLIP_VISION_PRESETS)},
    num_layers=lambda config, tower: config.num_layers[tower],
    embed_dims=lambda config: dict(config.embed_dims),
    encode_text=_text,
    encode_image=_image,
    text_padding="longest",
    max_text_length=lambda config: config.max_text_length,
    # Projections, as for CLIP; open_clip keeps most as bare parameters (never quantized), some as nn.Linear.
    quant_skip=(r"text\.text_projection", r"visual\.proj", r"visual\.head"),
    description="open_clip CLIP models: open_clip:<arch>[@<pretrained tag or checkpoint file>]",
    example="open_clip:ViT-B-16@/path/to/open_clip_model.safetensors",
    load=load_open_clip,
))
