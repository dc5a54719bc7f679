"""Load a backbone, its tokenizer and image processor through transformers' `from_pretrained`, and check them."""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import QuantConfig
from .quantized import prepare_quantized, quantized_loading_kwargs, resolve_dtype, unquantized_state
from .registry import BackboneFamily, family_for_name, get_family, resolve_short_name

logger = logging.getLogger(__name__)


class BackboneError(ValueError):
    """A checkpoint that cannot serve as the backbone it was named for."""


@dataclass
class Backbone:
    """A loaded dual encoder with what is needed to feed it and to recognise it again."""

    model: nn.Module
    family: BackboneFamily
    tokenizer: object
    image_processor: object
    name: str
    revision: str | None
    fingerprint: str
    quantization: QuantConfig | None = None  # what the loaded towers are quantized with (requested or stored)

    @property
    def text_padding(self) -> str:
        return self.family.text_padding

    @property
    def max_text_length(self) -> int:
        return self.family.max_text_length(self.model.config)

    @property
    def embed_dims(self) -> dict[str, int]:
        return self.family.embed_dims(self.model.config)


def weights_fingerprint(model: nn.Module, samples_per_tensor: int = 4096,
                        state: dict[str, torch.Tensor] | None = None) -> str:
    """A short hash of the weights: names, shapes and a strided sample of values, rounded to bf16.

    Rounding makes the fingerprint the same whether the backbone is stored in fp32 or bf16; the sample
    keeps it cheap for large models while any re-initialised or other checkpoint still changes it.
    `state` replaces `model.state_dict()`: a quantized model passes the tensors it was quantized from.
    """
    digest = hashlib.sha256()
    tensors = model.state_dict() if state is None else state
    for name in sorted(tensors):
        tensor = tensors[name]  # one at a time: a quantized model's `state` reads them from the checkpoint
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.float32).to(torch.bfloat16)
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_loading_info(family: BackboneFamily, name: str, info: dict) -> None:
    problems = []
    for kind in ("missing_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(kind) or []]
        tower_keys = [k for k in keys if family.tower_of(k)]
        if tower_keys:
            shown = ", ".join(sorted(tower_keys)[:8]) + (" ..." if len(tower_keys) > 8 else "")
            problems.append(f"{len(tower_keys)} tower weight(s) {kind.split('_')[0]} and newly initialised: {shown}")
        other = [k for k in keys if not family.tower_of(k)]
        if other:
            logger.warning("%s: weights outside the towers are newly initialised (unused by mmpeft): %s", name, other)
    if problems:
        raise BackboneError(
            f"Checkpoint {name!r} does not fit the {family.name!r} family ({family.description}): "
            + "; ".join(problems)
            + ". Its towers would train from random weights. Check that the checkpoint is of this family"
            " (e.g. a BLIP captioning checkpoint is not a blip-itm-* retrieval checkpoint) or set `model.family`."
        )


def _check_tokenizer(tokenizer, config, name: str) -> None:
    vocab_size = config.text_config.vocab_size
    if len(tokenizer) < vocab_size:
        raise BackboneError(
            f"The tokenizer loaded for {name!r} has {len(tokenizer)} tokens but the text tower expects "
            f"{vocab_size}. Offline, `from_pretrained(<hub id>)` can silently return a near-empty tokenizer: "
            "point `model.name` at a local folder that holds the tokenizer files."
        )


def resolve_model_name(name: str) -> str:
    """A registered short name becomes its local folder; anything else is passed to transformers as is."""
    return resolve_short_name(name) or name


_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _pickle_refused(name: str, has: str) -> BackboneError:
    return BackboneError(
        f"{name!r} has {has}. Pickle weight files can run code when loaded, so mmpeft reads only safetensors. "
        "Use a checkpoint with model.safetensors, or, if you trust this one, set `model.trust_pickle_weights=true` "
        "(load_backbone(..., trust_pickle_weights=True)); it is then read with torch.load(weights_only=True)."
    )


def _weights_error(name: str, location: str, err: OSError, trust_pickle_weights: bool) -> BackboneError:
    """Why no weights file could be read: pickle-only when that is the reason, else transformers' message."""
    folder = Path(location)
    if not trust_pickle_weights:
        found = [f for f in _PICKLE_WEIGHTS if (folder / f).is_file()] if folder.is_dir() else []
        if found:
            return _pickle_refused(name, f"only pickle weights ({', '.join(found)}) and no model.safetensors")
        if not folder.is_dir() and "safetensors" in str(err):  # a Hub repo without safetensors weights
            return _pickle_refused(name, "no safetensors weights (model.safetensors) on the Hub")
    return BackboneError(f"Cannot load model weights from {name!r}: {err}")


def load_backbone(name: str, *, family: str | None = None, revision: str | None = None,
                  dtype: str = "auto", quantization: QuantConfig | None = None,
                  device: str | torch.device | None = None, trust_pickle_weights: bool = False) -> Backbone:
    """Load a registered family's model, tokenizer and image processor from a Hub id or a local folder.

    Weights are read from safetensors only; `trust_pickle_weights` also accepts `pytorch_model.bin`, read with
    `torch.load(weights_only=True)` (no arbitrary objects, so no code runs while loading).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    own = family_for_name(name)  # `open_clip:...`, `dual:...`: families that bring their own loader
    if own is not None:
        from .custom import load_with_hook

        return load_with_hook(own, name, revision=revision, dtype=dtype, quantization=quantization, device=device,
                              trust_pickle_weights=trust_pickle_weights)
    location = resolve_model_name(name)
    if Path(location).expanduser().exists():
        location = str(Path(location).expanduser())
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
        raise _pickle_refused(name, f"a config.json that names a pickle weights file ({named})")
    try:
        model, info = spec.model_class().from_pretrained(
            location, revision=revision, dtype=torch_dtype, output_loading_info=True, **quant_kwargs,
            use_safetensors=None if trust_pickle_weights else True, weights_only=True,
        )
    except OSError as err:  # no weights file of an accepted kind
        raise _weights_error(name, location, err, trust_pickle_weights) from None
    except pickle.UnpicklingError as err:  # weights_only refused an object that is not a tensor
        # torch's message suggests weights_only=False; keep only the line that says what was refused.
        detail = next((line for line in str(err).splitlines() if "GLOBAL" in line), str(err))
        raise BackboneError(f"{name!r}: the pickle weight file holds more than tensors, so it was not loaded "
                            f"(torch.load(weights_only=True) refused it): {detail}") from None
    _check_loading_info(spec, name, info)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    _check_tokenizer(tokenizer, model.config, name)
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
