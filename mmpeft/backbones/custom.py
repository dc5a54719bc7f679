"""Loading for families with their own loader (open_clip, dual encoders): the same checks, weights policy,
fingerprint and quantization as the transformers path, plus the adapters that let the data layer feed them."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from ..config import QuantConfig
from ..errors import BackboneError
from .quantized import default_device, resolve_dtype
from .registry import Backbone, BackboneFamily
from .weights import check_loading_info, weights_fingerprint


def load_into(module: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> dict[str, list[str]]:
    """Load `state` into `module`; returns transformers-style loading info with keys named under `prefix`."""
    result = module.load_state_dict(state, strict=False)
    return {"missing_keys": [prefix + k for k in result.missing_keys],
            "unexpected_keys": [prefix + k for k in result.unexpected_keys]}


def seeded_init(build, seed: int = 0):
    """Build a randomly initialised module the same way every time: a backbone named without weights must
    fingerprint the same when an adapter trained on it is loaded again."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class TransformProcessor:
    """A torchvision transform with the call signature of a transformers image processor."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, images=None, return_tensors: str = "pt", **_: object) -> dict[str, torch.Tensor]:
        batch = [images] if isinstance(images, Image.Image) else list(images)
        return {"pixel_values": torch.stack([self.transform(image.convert("RGB")) for image in batch])}

    def __repr__(self) -> str:
        return f"TransformProcessor({self.transform})"

    def to_dict(self) -> dict:
        """Its settings, as a transformers processor's `to_dict`: the transform's repr names every size, crop and
        normalisation (the feature cache's key reads it)."""
        return {"processor": type(self).__name__, "transform": repr(self.transform)}


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter: what its inputs must be cast to."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def load_with_hook(spec: BackboneFamily, name: str, *, revision: str | None, dtype: str,
                   quantization: QuantConfig | None, device, trust_pickle_weights: bool,
                   allow_random_init: bool = False) -> Backbone:
    """`load_backbone` for a family with its own loader: load, check tower weights, fingerprint, quantize.

    A loader reports towers it had no weights for under `info["random_init"]`; they are refused unless
    `allow_random_init`.
    """
    from ..quant import TORCH_DTYPES, cast_unquantized, check_device, quantize_linears, skip_patterns

    torch_dtype = resolve_dtype(dtype, quantization)
    model, tokenizer, image_processor, info = spec.load(
        name.partition(":")[2], torch_dtype=torch_dtype, revision=revision, trust_pickle_weights=trust_pickle_weights)
    check_loading_info(spec, name, info)
    random_towers = info.get("random_init") or []
    if random_towers and not allow_random_init:
        raise BackboneError(
            f"{name!r}: no weights were given for {', '.join(random_towers)}, so it would start from random weights "
            "and train from scratch. Name a weights file (e.g. torchvision:resnet50@/path/resnet50.safetensors, "
            "timm:<name>@/path/weights.safetensors) or, to train from random weights on purpose, pass "
            "allow_random_init=True to load_backbone (config: model.allow_random_init=true).")
    model.eval()
    model.requires_grad_(False)
    fingerprint = weights_fingerprint(model)  # before quantizing: the checkpoint's own values
    if quantization is not None:
        model.to(check_device(device or default_device()))
        quantize_linears(model, quantization, skip_patterns(spec, quantization))
        cast_unquantized(model, TORCH_DTYPES[quantization.compute_dtype] if dtype == "auto" else torch_dtype)
    return Backbone(model=model, family=spec, tokenizer=tokenizer, image_processor=image_processor, name=name,
                    revision=revision, fingerprint=fingerprint, quantization=quantization)
