"""LoRA presets per tower architecture, for families whose towers come from several libraries (open_clip, dual).

Each preset is an anchored regex over module names inside one tower, `{layer}` standing for the layer index (for a
CNN: the block index within its last stage). A family's target for a tower is the union of its presets under the
tower's prefix: module names differ between architectures, so each loaded model matches exactly its own preset.
"""

from __future__ import annotations

import re

from torch import nn

# transformers text encoders.
TEXT_PRESETS = {
    # BERT, RoBERTa, XLM-R, ELECTRA, MiniLM (query/key/value) and DeBERTa-v2/v3 (query_proj/...): attention in, out.
    "bert": r"encoder\.layer\.{layer}\.attention\.(self\.(query|key|value)(_proj)?|output\.dense)",
    "distilbert": r"transformer\.layer\.{layer}\.attention\.(q_lin|k_lin|v_lin|out_lin)",
    "mpnet": r"encoder\.layer\.{layer}\.attention\.attn\.(q|k|v|o)",
    "modernbert": r"layers\.{layer}\.attn\.(Wqkv|Wo)",
}

# Image encoders. Transformers: attention in and out. CNNs: the last stage only, where features are most
# task-specific; ResNets: every convolution of its residual blocks (not the downsample shortcut); ConvNeXt: the
# pointwise (linear) layers of its blocks.
VISION_PRESETS = {
    # ViT, DeiT, DINOv2: q/k/v/o_proj in transformers 5, attention.(query|key|value) + output.dense in 4.x.
    "transformers-vit": r"(encoder\.)?layers?\.{layer}\.attention\.((q|k|v|o)_proj|attention\.(query|key|value)"
                        r"|output\.dense)",
    "transformers-convnext": r"encoder\.stages\.3\.layers\.{layer}\.(pwconv1|pwconv2)",
    "transformers-resnet": r"encoder\.stages\.3\.layers\.{layer}\.layer\.\d+\.convolution",
    "resnet": r"layer4\.{layer}\.conv[123]",  # torchvision, timm and open_clip's ModifiedResNet
    "timm-vit": r"blocks\.{layer}\.attn\.(qkv|proj)",
    "timm-convnext": r"stages\.3\.blocks\.{layer}\.mlp\.(fc1|fc2)",
}


def tower_pattern(prefix: str, presets: dict[str, str] | list[str]) -> str:
    """One anchored regex: any of `presets` under the module-name prefix `prefix` (a regex, e.g. `text_model\\.`)."""
    bodies = presets.values() if isinstance(presets, dict) else presets
    return prefix + "(?:" + "|".join(f"(?:{body})" for body in bodies) + ")"


def count_layers(model: nn.Module, prefix: str, presets: dict[str, str] | list[str]) -> int:
    """Layers (`{layer}` indices) the presets reach in `model`: one more than the highest index matched, or 0."""
    bodies = presets.values() if isinstance(presets, dict) else presets
    regexes = [re.compile(prefix + body.replace("{layer}", r"(?P<layer>\d+)", 1)) for body in bodies]
    indices = [int(m.group("layer")) for name, _ in model.named_modules() for r in regexes
               if (m := r.fullmatch(name)) and "layer" in r.groupindex]
    return max(indices, default=-1) + 1
