"""Loading a backbone quantized: transformers' arguments for it, and what it looked like before quantization."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import torch
from torch import nn

from ..config import QuantConfig
from ..quant import TORCH_DTYPES, bnb_config, check_device, keep_trainable_layout, quantized_modules

logger = logging.getLogger(__name__)


def resolve_dtype(dtype: str, quantization: QuantConfig | None) -> torch.dtype:
    """`auto`: float32 for a full-precision backbone; a quantized one keeps its other parts in the compute dtype,
    since float32 there would cost more memory than 4-bit weights save (ANCHORS §1: plain QLoRA)."""
    if dtype == "auto":
        return TORCH_DTYPES[quantization.compute_dtype] if quantization else torch.float32
    return TORCH_DTYPES[dtype]


def default_device() -> torch.device:
    """Where transformers puts a quantized model when no device_map is given."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def quantized_loading_kwargs(family, quantization: QuantConfig, device: str | torch.device | None) -> dict:
    """`from_pretrained` arguments that quantize the towers while the checkpoint is read."""
    config = bnb_config(quantization, family)  # first: its error names the setting when bitsandbytes is missing
    return {"quantization_config": config, "device_map": {"": check_device(device or default_device())}}


def prepare_quantized(model: nn.Module, family) -> QuantConfig | None:
    """Ready a loaded model's bitsandbytes layers for training, and return the quantization it actually has
    (requested, or stored in a pre-quantized checkpoint); None for a model without quantized layers."""
    names = quantized_modules(model)
    if not names:
        return None
    keep_trainable_layout(model)
    stored = getattr(model.config, "quantization_config", None)
    get = (stored.get if isinstance(stored, dict) else lambda k, d=None: getattr(stored, k, d)) if stored else None
    bits = 8 if get and get("load_in_8bit", False) else 4
    if not get:  # quantized by `quantize_linears`: read the layers
        import bitsandbytes as bnb

        layer = model.get_submodule(names[0])
        bits = 4 if isinstance(layer, bnb.nn.Linear4bit) else 8
    compute = get("bnb_4bit_compute_dtype", "bfloat16") if get else "bfloat16"
    towers = sorted({family.tower_of(n) for n in names} - {None})
    return QuantConfig(
        bits=bits,
        quant_type=(get("bnb_4bit_quant_type", "nf4") if get else "nf4"),
        double_quant=bool(get("bnb_4bit_use_double_quant", False)) if get else True,
        compute_dtype=str(compute).removeprefix("torch."),
        towers=towers or ["text", "vision"],
    )


def _checkpoint_files(location: str, revision: str | None) -> list[str]:
    """The safetensors file(s) a checkpoint's weights are read from (local folder or Hub cache)."""
    from transformers.utils import cached_file

    def find(name: str) -> str | None:
        return cached_file(location, name, revision=revision, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    index = find("model.safetensors.index.json")
    if index:
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [find(shard) for shard in shards]
    single = find("model.safetensors")
    return [single] if single else []


class _CheckpointState(Mapping):
    """name -> tensor, each read when asked for: a quantized weight from the checkpoint file, anything else from
    the model; nothing is kept, so hashing a model this way costs one tensor of memory at a time."""

    def __init__(self, model: nn.Module, location: str, revision: str | None):
        from safetensors import safe_open

        self.quantized = {name: model.get_submodule(name) for name in quantized_modules(model)}
        self.model_state = model.state_dict()
        self.handles = {}
        for path in _checkpoint_files(location, revision):
            handle = safe_open(path, framework="pt")
            self.handles.update({key: handle for key in handle.keys()})
        self.location = location
        self.keys_ = []
        for key in self.model_state:
            owner = self._owner(key)
            # an unquantized model has a weight and a bias here, no quantization state (absmax, SCB, ...)
            if owner is None or key[len(owner) + 1:] in ("weight", "bias"):
                self.keys_.append(key)

    def _owner(self, key: str) -> str | None:
        return next((q for q in self.quantized if key.startswith(q + ".")), None)

    def __getitem__(self, key: str) -> torch.Tensor:
        owner = self._owner(key)
        if owner is None or key != owner + ".weight":
            return self.model_state[key]
        if key in self.handles:
            return self.handles[key].get_tensor(key)
        from peft.utils.integrations import dequantize_bnb_weight

        logger.warning("%s: %s is not in a safetensors file; fingerprinting its dequantized value, which differs "
                       "from an unquantized load of the same checkpoint.", self.location, key)
        module = self.quantized[owner]
        return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def unquantized_state(model: nn.Module, location: str, revision: str | None) -> Mapping[str, torch.Tensor]:
    """The state dict the same checkpoint would give loaded without quantization: each quantized weight is read
    back from the checkpoint file (lazily), every other tensor is the model's own (only its dtype may differ).

    Falls back to dequantized weights, with a warning, when the checkpoint is not in safetensors.
    """
    return _CheckpointState(model, location, revision)
