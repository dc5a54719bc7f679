"""Backbone families (CLIP, SigLIP, BLIP, open_clip, dual encoders), their registry and the loader."""

from ..errors import BackboneError
from . import (  # noqa: F401  (register open_clip, dual encoders, packaged checkpoints)
    dual,
    families,  # noqa: F401  (registers the transformers families)
    openclip,
    packaged,
)
from .embedded import EMBEDDED_BACKBONE  # noqa: F401  (registers the offline short names)
from .loading import load_backbone
from .registry import (
    Backbone,
    BackboneFamily,
    TowerOutput,
    get_family,
    list_backbones,
    register_backbone,
    register_short_name,
)
from .weights import weights_fingerprint

__all__ = [
    "Backbone",
    "BackboneError",
    "BackboneFamily",
    "TowerOutput",
    "get_family",
    "list_backbones",
    "load_backbone",
    "register_backbone",
    "register_short_name",
    "weights_fingerprint",
]
