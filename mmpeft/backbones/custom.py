"""Loading for families with their own loader (open_clip, dual encoders): the same checks, weights policy,
fingerprint and quantization as the transformers path, plus the adapters that let the data layer feed them."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..config import QuantConfig
from .loading import Backbone, BackboneError, _check_loading_info, _pickle_refused, weights_fingerprint
from .quantized import default_device, resolve_dtype
from .registry import BackboneFamily

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_weights(path: str | Path, name: str, trust_pickle_weights: bool) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file; a pickle file only when trusted, and then without arbitrary objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(f"{name!r}: the weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if not trust_pickle_weights:
        raise _pickle_refused(name, f"a weights file that is not safetensors ({path.name})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line for line in str(err).splitlines() if "GLOBAL" in line), str(err))
        raise BackboneError(f"{name!r}: the pickle weight file holds more than tensors, so it was not loaded "
                            f"(torch.load(weights_only=True) refused it): {detail}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k.removeprefix("module."): v for k, v in state.items()}


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


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter: what its inputs must be cast to."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def load_with_hook(spec: BackboneFamily, name: str, *, revision: str | None, dtype: str,
                   quantization: QuantConfig | None, device, trust_pickle_weights: bool) -> Backbone:
    """`load_backbone` for a family with its own loader: load, check tower weights, fingerprint, quantize."""
    from ..quant import TORCH_DTYPES, cast_unquantized, check_device, quantize_linears, skip_patterns

    torch_dtype = resolve_dtype(dtype, quantization)
    model, tokenizer, image_processor, info = spec.load(
        name.partition(":")[2], torch_dtype=torch_dtype, revision=revision, trust_pickle_weights=trust_pickle_weights)
    _check_loading_info(spec, name, info)
    model.eval()
    model.requires_grad_(False)
    fingerprint = weights_fingerprint(model)  # before quantizing: the checkpoint's own values
    if quantization is not None:
        model.to(check_device(device or default_device()))
        quantize_linears(model, quantization, skip_patterns(spec, quantization))
        cast_unquantized(model, TORCH_DTYPES[quantization.compute_dtype] if dtype == "auto" else torch_dtype)
    return Backbone(model=model, family=spec, tokenizer=tokenizer, image_processor=image_processor, name=name,
                    revision=revision, fingerprint=fingerprint, quantization=quantization)
