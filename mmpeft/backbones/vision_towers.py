"""Image encoders for dual encoders: a transformers vision model, a torchvision ResNet or a timm model.

Each loader returns (module, image processor, pooled width, loading info); `vision_features` runs any of them and
returns the global pooled features and the spatial (or patch) tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BackboneError
from .custom import TransformProcessor, float_dtype, load_into, seeded_init
from .weights import load_transformers_model, read_weights, resolve_location

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_library_spec(spec: str) -> tuple[str, str, str | None]:
    """`torchvision:resnet50@w.safetensors` -> ("torchvision", "resnet50", "w.safetensors"); a transformers id or
    folder -> ("transformers", spec, None)."""
    library, sep, rest = spec.partition(":")
    if sep and library in ("torchvision", "timm"):
        arch, _, weights = rest.partition("@")
        return library, arch, weights or None
    return "transformers", spec, None


def load_vision_tower(spec: str, *, image_size: int | None, torch_dtype: torch.dtype, revision: str | None,
                      trust_pickle_weights: bool):
    library, arch, weights = parse_library_spec(spec)
    if library == "transformers":
        return _transformers_tower(arch, torch_dtype, revision, trust_pickle_weights, image_size)
    name = f"{library}:{arch}"
    model, width = (_torchvision_resnet if library == "torchvision" else _timm_model)(arch, name)
    # No weights file: seeded random weights, reported so the loader refuses them unless they were asked for.
    info = (load_into(model, read_weights(weights, spec, trust_pickle_weights), "vision_model.") if weights
            else {"random_init": [f"vision={spec}"]})
    processor = _torchvision_processor(image_size or 224) if library == "torchvision" else _timm_processor(model,
                                                                                                        image_size)
    return model.to(torch_dtype), processor, width, info


def _torchvision_resnet(arch: str, name: str) -> tuple[nn.Module, int]:
    import torchvision

    try:
        model = seeded_init(lambda: torchvision.models.get_model(arch, weights=None))
    except ValueError as err:
        raise BackboneError(f"{name!r}: {err}") from None
    if not isinstance(model, torchvision.models.ResNet):
        raise BackboneError(f"{name!r}: torchvision towers must be ResNets (resnet*, resnext*, wide_resnet*); got "
                            f"{type(model).__name__}. Use `timm:<name>` for other image models.")
    width = model.fc.in_features
    model.fc = nn.Identity()  # classification never uses it; a checkpoint's fc weights load as "unexpected"
    return model, width


def _timm_model(arch: str, name: str) -> tuple[nn.Module, int]:
    import timm

    try:
        model = seeded_init(lambda: timm.create_model(arch, pretrained=False, num_classes=0))
    except RuntimeError as err:  # unknown model
        raise BackboneError(f"{name!r}: {err}") from None
    return model, model.num_features


def _torchvision_processor(size: int) -> TransformProcessor:
    from torchvision import transforms as T

    return TransformProcessor(T.Compose([
        T.Resize(size * 256 // 224, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(size), T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))


def _timm_processor(model: nn.Module, image_size: int | None) -> TransformProcessor:
    import timm.data

    overrides = {"input_size": (3, image_size, image_size)} if image_size else {}
    config = timm.data.resolve_data_config(overrides, model=model)
    return TransformProcessor(timm.data.create_transform(**config, is_training=False))


def transformers_encoder_class(location: str, revision: str | None, input_name: str, kind: str, examples: str):
    """(location, config, model class) of a transformers encoder whose input is `input_name`, or a clear error."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    location = resolve_location(location)
    try:
        config = AutoConfig.from_pretrained(location, revision=revision)
    except OSError as err:
        raise BackboneError(f"Cannot load a {kind} model config from {location!r}: {err}") from None
    model_class = MODEL_MAPPING.get(type(config), None)
    if model_class is None or getattr(model_class, "main_input_name", None) != input_name:
        raise BackboneError(f"{location!r} ({config.model_type}) is not a transformers {kind} encoder ({examples}).")
    return location, config, model_class


def _transformers_tower(location: str, torch_dtype, revision, trust_pickle_weights, image_size):
    from transformers import AutoImageProcessor

    location, config, model_class = transformers_encoder_class(
        location, revision, "pixel_values", "image",
        "a model whose input is pixel_values, e.g. ViT, ConvNeXt, ResNet, DINOv2")
    if image_size:
        raise BackboneError(f"{location!r}: `image_size` applies to torchvision and timm towers; a transformers "
                            "tower uses its own image processor.")
    model, info = load_transformers_model(model_class, location, revision, torch_dtype, trust_pickle_weights,
                                          "vision_model.")
    processor = AutoImageProcessor.from_pretrained(location, revision=revision)
    sizes = getattr(config, "hidden_sizes", None)
    return model, processor, sizes[-1] if sizes else config.hidden_size, info


def vision_features(tower: nn.Module, library: str, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, D), tokens (B, N, D)) of an image tower of any supported library."""
    pixel_values = pixel_values.to(float_dtype(tower))
    if library == "transformers":
        out = tower(pixel_values=pixel_values)
        features = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # ViT-like without pooling layer: the class token after the final norm
            pooled = features[:, 0] if features.dim() == 3 else features.mean((2, 3))
        pooled = pooled.flatten(1)
    elif library == "timm":
        features = tower.forward_features(pixel_values)
        pooled = tower.forward_head(features, pre_logits=True)
    else:  # torchvision ResNet, without its classifier
        x = tower.maxpool(tower.relu(tower.bn1(tower.conv1(pixel_values))))
        features = tower.layer4(tower.layer3(tower.layer2(tower.layer1(x))))
        pooled = features.mean((2, 3))
    tokens = features.flatten(2).transpose(1, 2) if features.dim() == 4 else features
    return pooled, tokens
