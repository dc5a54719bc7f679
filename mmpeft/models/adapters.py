"""Per-tower trainability through peft: one stock LoRA adapter for the LoRA towers, `modules_to_save` for full ones."""

from __future__ import annotations

import os
import re
from collections import defaultdict

from torch import nn

from ..backbones import Backbone
from ..backbones.registry import TOWERS, BackboneFamily
from ..config import LoraSettings, ModelConfig
from ..errors import ConfigError


def tower_targets(family: BackboneFamily, tower: str, lora: LoraSettings, num_layers: int) -> str:
    """The anchored regex of the modules that get LoRA in one tower (the family preset unless overridden)."""
    pattern = lora.targets or family.lora_targets[tower]
    if lora.layers is None:
        return pattern.replace("{layer}", r"\d+")
    if "{layer}" not in pattern:
        raise ConfigError(f"`model.{tower}.lora.layers` needs `{{layer}}` in the target regex, got {pattern!r}.")
    if lora.layers > num_layers:
        raise ConfigError(f"`model.{tower}.lora.layers={lora.layers}` but the {tower} tower has {num_layers} layers.")
    last = "|".join(str(i) for i in range(num_layers - lora.layers, num_layers))
    return pattern.replace("{layer}", f"(?:{last})")


def _shared_setting(settings: dict[str, LoraSettings], name: str):
    """peft keeps some settings once per adapter: LoRA towers must agree on them."""
    values = {tower: getattr(s, name) for tower, s in settings.items()}
    if len(set(map(repr, values.values()))) > 1:
        raise ConfigError(f"peft applies one `{name}` to the whole adapter, but the LoRA towers differ: "
                         + ", ".join(f"model.{t}.lora.{name}={v!r}" for t, v in values.items()))
    return next(iter(values.values()))


def build_lora_config(backbone: Backbone, cfg: ModelConfig):
    """The single peft `LoraConfig` covering every LoRA tower and full tower, or None if all are frozen."""
    from peft import LoraConfig
    from peft.utils.constants import DUMMY_TARGET_MODULES

    family, config = backbone.family, backbone.model.config
    modes = {tower: getattr(cfg, tower).mode for tower in TOWERS}
    lora_towers = {t: getattr(cfg, t).lora for t in TOWERS if modes[t] == "lora"}
    full_modules = [m for t in TOWERS if modes[t] == "full" for m in family.tower_modules[t]]
    if not lora_towers and not full_modules:
        return None
    patterns = {t: tower_targets(family, t, s, family.num_layers(config, t)) for t, s in lora_towers.items()}
    first = next(iter(lora_towers.values()), LoraSettings())
    rank_pattern = {patterns[t]: s.r for t, s in lora_towers.items() if s.r != first.r}
    alpha_pattern = {patterns[t]: s.alpha for t, s in lora_towers.items() if s.alpha != first.alpha}
    shared = {n: _shared_setting(lora_towers, n) for n in ("dropout", "use_dora", "extra")} if lora_towers else {}
    target = "|".join(f"(?:{p})" for p in patterns.values())
    if not patterns:
        # Full towers only: peft raises when `target_modules` matches nothing, except for its dummy marker,
        # which it accepts as "no LoRA layers" while still wrapping `modules_to_save`.
        target = DUMMY_TARGET_MODULES
    return LoraConfig(
        r=first.r,
        lora_alpha=first.alpha,
        lora_dropout=shared.get("dropout", 0.0),
        use_dora=shared.get("use_dora", False),
        target_modules=target,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=full_modules or None,
        **shared.get("extra", {}),
    )


def attach_adapters(backbone: Backbone, cfg: ModelConfig, lora_config=None) -> nn.Module:
    """Wrap the backbone with peft as the tower modes ask; frozen everywhere else.

    `lora_config` (a saved adapter's `LoraConfig`) replaces the one the family presets would build, so an adapter
    saved when the presets differed gets exactly its own target modules, ranks and `modules_to_save` back.
    Returns the `PeftModel`, or the untouched (frozen) model when both towers are frozen.
    """
    from peft import get_peft_model

    lora_config = lora_config or build_lora_config(backbone, cfg)
    if lora_config is None:
        return backbone.model
    try:
        model = get_peft_model(backbone.model, lora_config)
    except ValueError as err:
        raise ConfigError(f"peft could not attach the adapter to {backbone.name!r}: {err}") from None
    pin_mha_base_weights(model)
    unused = backbone.family.unused_in_full
    if unused:
        # Full towers must not carry parameters that never get a gradient (dead weights, DDP errors).
        for name, param in model.base_model.model.named_parameters():
            plain = name.replace(".modules_to_save.default", "")
            if re.fullmatch(unused, plain):
                param.requires_grad_(False)
    for tower in TOWERS:
        if getattr(cfg, tower).mode == "lora" and not any(
            backbone.family.tower_of(n) == tower for n in lora_module_names(model)
        ):
            raise ConfigError(f"`model.{tower}.mode=lora` but no module of {backbone.name!r} matches the {tower} "
                             f"target regex; check `model.{tower}.lora.targets`.")
    return model


def pin_mha_base_weights(model: nn.Module) -> int:
    """Keep the frozen weights of LoRA'd `nn.MultiheadAttention` layers exact; returns how many layers it guards.

    peft's LoRA on nn.MultiheadAttention adds the update into the base weights before every forward and subtracts
    it afterwards, re-registering `in_proj_weight` and `out_proj.weight` each time. (W + d) - d is not W in floating
    point: the frozen weights drift with every forward, training and evaluation alike (bf16 open_clip ViT: 13 % of a
    layer's weights changed after 20 evaluation passes, by up to 12 %). Each forward here ends with the original
    parameter objects put back, so the base stays bit-exact and the parameters keep their identity.
    """
    from peft.tuners.lora.layer import MultiheadAttention

    layers = [m for m in model.modules() if isinstance(m, MultiheadAttention)]
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if layers and backend not in ("no", ""):
        raise ConfigError(
            f"LoRA on nn.MultiheadAttention (open_clip towers) cannot be compiled: peft swaps the layer's weights "
            f"inside forward, which torch.compile rejects ('set_ on a graph input'), but accelerate was launched with "
            f"dynamo_backend={backend}. Launch without `--dynamo_backend` (or `dynamo_backend: 'NO'`), or set the "
            "open_clip towers to `frozen` or `full`.")
    for layer in layers:
        layer.register_forward_pre_hook(_stash_mha_weights)
        layer.register_forward_hook(_restore_mha_weights, always_call=True)
    return len(layers)


def _mha_weight_owners(layer: nn.Module) -> tuple[tuple[nn.Module, str], tuple[nn.Module, str]]:
    base = layer.get_base_layer()
    return (base, "in_proj_weight"), (base.out_proj.get_base_layer(), "weight")


def _stash_mha_weights(layer: nn.Module, args) -> None:
    layer.__dict__["_pinned_weights"] = [owner._parameters[name] for owner, name in _mha_weight_owners(layer)]


def _restore_mha_weights(layer: nn.Module, args, output) -> None:
    pinned = layer.__dict__.pop("_pinned_weights", None)
    if pinned is None:
        return
    for (owner, name), param in zip(_mha_weight_owners(layer), pinned):
        if owner._parameters.get(name) is not param:
            delattr(owner, name)
            owner.register_parameter(name, param)


def lora_module_names(model: nn.Module) -> list[str]:
    """Names (relative to the unwrapped model) of the modules that carry a LoRA layer."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return sorted(n.removeprefix(prefix) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def trainable_report(model: nn.Module, family: BackboneFamily) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per part: text, vision, head, other."""
    report: dict[str, dict[str, int]] = defaultdict(lambda: {"trainable": 0, "total": 0})
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue  # a full tower's frozen original: the trained copy beside it is what counts
        plain = name.removeprefix("backbone.").removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        part = "head" if name.startswith("head.") else (family.tower_of(plain) or "other")
        report[part]["total"] += param.numel()
        if param.requires_grad:
            report[part]["trainable"] += param.numel()
    return dict(report)
