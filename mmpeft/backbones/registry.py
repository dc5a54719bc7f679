"""The backbone registry: one `BackboneFamily` per model family, looked up by name or by `config.model_type`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..errors import BackboneError

TOWERS = ("text", "vision")


class TowerOutput(NamedTuple):
    """A tower's pooled embedding (B, D), its token states (B, T, H) and the tokens' mask (B, T) or None."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor | None


@dataclass(frozen=True)
class BackboneFamily:
    """Everything mmpeft needs to know about one model family, in one place.

    LoRA target patterns are anchored regular expressions over module names of the loaded model
    (peft full-matches a string `target_modules`); `{layer}` stands for the layer index so that
    "last N layers" is a substitution, not a second pattern.
    """

    name: str
    model_types: tuple[str, ...]  # `config.model_type` values served by this family
    model_class: Callable[[], type]  # imported lazily: transformers imports are slow
    tower_modules: dict[str, tuple[str, ...]]  # tower -> top-level modules that make it up
    lora_targets: dict[str, str]  # tower -> target regex with `{layer}`
    num_layers: Callable[[object, str], int]  # (model config, tower) -> layer count
    embed_dims: Callable[[object], dict[str, int]]  # config -> text / vision pooled and token widths
    encode_text: Callable[[nn.Module, torch.Tensor, torch.Tensor], TowerOutput]
    encode_image: Callable[[nn.Module, torch.Tensor], TowerOutput]
    text_padding: str  # "longest" (pooling is exact under padding) or "max_length" (it is not)
    max_text_length: Callable[[object], int]
    unused_in_full: str | None = None  # regex of tower parameters that classification never uses
    # Anchored regexes of linear layers kept out of 4/8-bit quantization (a pattern covers the module and all
    # below it); each family says which measured quality loss justifies its list (benchmarks/quant_skips.py).
    quant_skip: tuple[str, ...] = ()
    description: str = ""
    example: str = ""
    # Families that transformers does not load name themselves as `<family name>:<spec>` and bring a loader:
    # (spec, torch_dtype=, revision=, trust_pickle_weights=) -> (model, tokenizer, image_processor, loading info).
    # The model carries a `config` that `num_layers`, `embed_dims` and `max_text_length` read. None: from_pretrained.
    load: Callable[..., tuple] | None = None

    def __post_init__(self) -> None:
        if set(self.tower_modules) != set(TOWERS) or set(self.lora_targets) != set(TOWERS):
            raise ValueError(f"Backbone family {self.name!r} must describe both towers {TOWERS}.")
        if self.text_padding not in ("longest", "max_length"):
            raise ValueError(f"`text_padding` of {self.name!r} must be 'longest' or 'max_length'.")

    def tower_of(self, param_name: str) -> str | None:
        """Which tower a parameter of the (unwrapped) model belongs to, or None (e.g. CLIP's logit_scale)."""
        for tower, modules in self.tower_modules.items():
            if any(param_name == m or param_name.startswith(m + ".") for m in modules):
                return tower
        return None


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
    quantization: object | None = None  # the QuantConfig the loaded towers are quantized with (requested or stored)

    @property
    def text_padding(self) -> str:
        return self.family.text_padding

    @property
    def max_text_length(self) -> int:
        return self.family.max_text_length(self.model.config)

    @property
    def embed_dims(self) -> dict[str, int]:
        return self.family.embed_dims(self.model.config)


_FAMILIES: dict[str, BackboneFamily] = {}
_SHORT_NAMES: dict[str, Callable[[], str]] = {}
_SHORT_DESCRIPTIONS: dict[str, str] = {}


def register_backbone(family: BackboneFamily) -> BackboneFamily:
    """Add a family; names and model types must be new."""
    if family.name in _FAMILIES:
        raise ValueError(f"Backbone family {family.name!r} is already registered.")
    for other in _FAMILIES.values():
        clash = set(family.model_types) & set(other.model_types)
        if clash:
            raise ValueError(f"model_type(s) {sorted(clash)} already belong to family {other.name!r}.")
    _FAMILIES[family.name] = family
    return family


def register_short_name(name: str, resolve: Callable[[], str], description: str = "built offline on first use"
                        ) -> None:
    """Register a short model name; `resolve()` returns the local folder it stands for."""
    if name in _SHORT_NAMES:
        raise ValueError(f"Short backbone name {name!r} is already registered.")
    _SHORT_NAMES[name] = resolve
    _SHORT_DESCRIPTIONS[name] = description


def family_for_name(name: str) -> BackboneFamily | None:
    """The family a `<family>:<spec>` name belongs to, for families with their own loader; None otherwise."""
    scheme, sep, _ = name.partition(":")
    family = _FAMILIES.get(scheme) if sep else None
    return family if family is not None and family.load is not None else None


def resolve_short_name(name: str) -> str | None:
    resolve = _SHORT_NAMES.get(name)
    return resolve() if resolve else None


def get_family(name: str) -> BackboneFamily:
    """Look a family up by its name or by a `config.model_type`."""
    if name in _FAMILIES:
        return _FAMILIES[name]
    for family in _FAMILIES.values():
        if name in family.model_types:
            return family
    raise BackboneError(f"Backbone family {name!r} is not supported. Supported families: {sorted(_FAMILIES)}; "
                     f"short names: {sorted(_SHORT_NAMES)}. See `mmpeft.list_backbones()`.")


def list_backbones() -> list[dict[str, str]]:
    """One row per family and short name: what it is, which class loads it, and an example checkpoint."""
    rows = [
        {"name": f.name, "kind": "family", "model_types": ", ".join(f.model_types),
         "description": f.description, "example": f.example}
        for f in _FAMILIES.values()
    ]
    rows += [{"name": n, "kind": "short name", "model_types": "", "description": _SHORT_DESCRIPTIONS[n],
              "example": n} for n in _SHORT_NAMES]
    return rows
