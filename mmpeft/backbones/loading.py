"""Load a backbone, its tokenizer and image processor through transformers' `from_pretrained`, and check them."""

from __future__ import annotations

import logging

import torch

from ..config import QuantConfig
from ..errors import BackboneError
from .custom import load_with_hook
from .quantized import prepare_quantized, quantized_loading_kwargs, resolve_dtype, unquantized_state
from .registry import Backbone, family_for_name, get_family
from .weights import (
    check_loading_info,
    check_tokenizer,
    from_pretrained_safely,
    pickle_refused,
    resolve_location,
    weights_fingerprint,
)

logger = logging.getLogger(__name__)


def load_backbone(name: str, *, family: str | None = None, revision: str | None = None,
                  dtype: str = "auto", quantization: QuantConfig | None = None,
                  device: str | torch.device | None = None, trust_pickle_weights: bool = False,
                  allow_random_init: bool = False) -> Backbone:
    """Load a registered family's model, tokenizer and image processor from a Hub id or a local folder.

    Weights are read from safetensors only; `trust_pickle_weights` also accepts `pytorch_model.bin`, read with
    `torch.load(weights_only=True)` (no arbitrary objects, so no code runs while loading).
    A tower that would start from random weights (a `dual:` torchvision or timm tower named without `@weights`)
    is refused unless `allow_random_init`.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    own = family_for_name(name)  # `open_clip:...`, `dual:...`: families that bring their own loader
    if own is not None:
        return load_with_hook(own, name, revision=revision, dtype=dtype, quantization=quantization, device=device,
                              trust_pickle_weights=trust_pickle_weights, allow_random_init=allow_random_init)
    location = resolve_location(name)
    try:
        config = AutoConfig.from_pretrained(location, revision=revision)
    except OSError as err:
        raise BackboneError(f"Cannot load a model config from {name!r}: {err}") from None
    spec = get_family(family or config.model_type)
    # Quantized towers are read and quantized layer by layer; `device` (default: the GPU if any) is where.
    quant_kwargs = quantized_loading_kwargs(spec, quantization, device) if quantization else {}
    torch_dtype = resolve_dtype(dtype, quantization)
    named = getattr(config, "transformers_weights", None)  # config.json may name the weights file itself
    if named and not trust_pickle_weights and not named.endswith((".safetensors", ".safetensors.index.json")):
        raise pickle_refused(name, f"a config.json that names a pickle weights file ({named})")
    model, info = from_pretrained_safely(spec.model_class(), location, name, revision=revision,
                                         torch_dtype=torch_dtype, trust_pickle_weights=trust_pickle_weights,
                                         **quant_kwargs)
    check_loading_info(spec, name, info)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    check_tokenizer(tokenizer, model.config.text_config.vocab_size, name)
    image_processor = AutoImageProcessor.from_pretrained(location, revision=revision)
    model.eval()
    model.requires_grad_(False)
    loaded_quant = prepare_quantized(model, spec)
    # The fingerprint names the checkpoint, so a quantized load of it must hash what it was quantized from.
    state = unquantized_state(model, location, revision) if loaded_quant else None
    return Backbone(
        model=model,
        family=spec,
        tokenizer=tokenizer,
        image_processor=image_processor,
        name=name,
        revision=revision or getattr(config, "_commit_hash", None),
        fingerprint=weights_fingerprint(model, state=state),
        quantization=loaded_quant,
    )
