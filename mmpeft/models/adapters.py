"""Per-tower trainability through peft: one stock LoRA adapter for the LoRA towers, `modules_to_save` for full ones."""

from __future__ import annotations

import math
import os
import re
import warnings

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


def peft_wrap(model: nn.Module, lora_config) -> nn.Module:
    """peft's `get_peft_model`, without the FutureWarning it triggers on every transformers model.

    peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecated in favour of
    `is_activation_checkpointing`; the warning is about peft's code, not the user's, so it is silenced here only.
    """
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora_config)


def attach_adapters(backbone: Backbone, cfg: ModelConfig, lora_config=None) -> nn.Module:
    """Wrap the backbone with peft as the tower modes ask; frozen everywhere else.

    `lora_config` (a saved adapter's `LoraConfig`) replaces the one the family presets would build, so an adapter
    saved when the presets differed gets exactly its own target modules, ranks and `modules_to_save` back.
    Returns the `PeftModel`, or the untouched (frozen) model when both towers are frozen.
    """
    lora_config = lora_config or build_lora_config(backbone, cfg)
    if lora_config is None:
        return backbone.model
    try:
        model = peft_wrap(backbone.model, lora_config)
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
    """Names of the modules that carry a LoRA layer, relative to the unwrapped backbone model
    (`text_model.encoder.layers.0.self_attn.q_proj`), whether given the `PeftModel` or a classifier holding it."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return sorted(n.split(prefix, 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer))


def weight_count(param: nn.Parameter) -> int:
    """How many weights a parameter holds: a bitsandbytes 4-bit tensor packs two per byte (its shape is the
    packed storage, `quant_state.shape` the weight's)."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return math.prod(shape) if shape is not None else param.numel()


def trainable_report(model: nn.Module, family: BackboneFamily | None = None) -> dict[str, dict[str, float]]:
    """Trainable and total weights per part: text, vision, head, and `other` only when something there trains.

    Each part has `trainable`, `total` and `percent` (trainable share of the part). Quantized weights count as
    weights, not packed bytes. `family` defaults to the model's own (`model.family`).
    """
    family = family or getattr(model, "family", None)
    if family is None:
        raise TypeError(f"trainable_report: {type(model).__name__} has no `.family`; pass the backbone family.")
    report: dict[str, dict[str, float]] = {part: {"trainable": 0, "total": 0} for part in ("text", "vision", "head")}
    report["other"] = {"trainable": 0, "total": 0}
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue  # a full tower's frozen original: the trained copy beside it is what counts
        plain = name.removeprefix("backbone.").removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        part = "head" if name.startswith("head.") else (family.tower_of(plain) or "other")
        count = weight_count(param)
        report[part]["total"] += count
        if param.requires_grad:
            report[part]["trainable"] += count
    if not report["other"]["trainable"]:
        del report["other"]  # CLIP's logit_scale and the like: frozen, and not what anyone asks about
    for counts in report.values():
        counts["percent"] = round(100 * counts["trainable"] / counts["total"], 3) if counts["total"] else 0.0
    return report


def format_trainable(report: dict[str, dict[str, float]]) -> str:
    """One line for the log: `trainable parameters: text 36,864 / 1.02M (3.61%), vision ..., all ...`."""
    def part(name: str, trainable: float, total: float) -> str:
        share = 100 * trainable / total if total else 0.0
        return f"{name} {int(trainable):,} / {_short_count(total)} ({share:.2f}%)"

    parts = [part(name, c["trainable"], c["total"]) for name, c in report.items() if c["total"]]
    trainable, total = (sum(c[k] for c in report.values()) for k in ("trainable", "total"))
    return "trainable parameters: " + ", ".join(parts + [part("all", trainable, total)])


def _short_count(n: float) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{int(n)}"
