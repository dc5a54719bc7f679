"""The temperature of image-text similarities: the backbone's learned one where it has it, else one default."""

from __future__ import annotations

# CLIP's initial temperature, 1 / 0.07: for backbones without a learned logit scale (dual encoders, BLIP's
# transformers port). The prompt head trains its scale from here; a retrieval run records the one it used.
DEFAULT_LOGIT_SCALE = 1 / 0.07


def backbone_logit_scale(model) -> float:
    """exp(logit_scale) of a CLIP-style model, or `DEFAULT_LOGIT_SCALE` when it has none."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().float().exp()) if scale is not None else DEFAULT_LOGIT_SCALE
