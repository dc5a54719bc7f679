"""Estimate the peak memory of full fine-tuning, LoRA and QLoRA before renting a GPU: `mmpeft plan`.

The model is built on the meta device from its config (no weights are read), so every parameter is counted
exactly: which linear layers a QLoRA run quantizes (the family's towers and skip list), which carry LoRA (the
family's presets), what stays in bf16 or fp32. Activations are counted per encoder layer and token from what
autograd keeps for the backward pass, and checked against benchmarks/results/memory_*.json (tests/test_plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BackboneError

GPU_SIZES_GB = (8, 12, 16, 24, 48, 80)
# Families whose model the planner builds on the meta device from a transformers config.
PLANNED_FAMILIES = ("clip", "siglip", "blip")
GIB = 2**30
# Not counted by torch.cuda.max_memory_allocated but needed on the card: the CUDA context and kernels, and
# the caching allocator's fragmentation (a share of the tensors' peak).
CUDA_CONTEXT_GIB = 0.6
CUDA_FRAGMENTATION = 0.10
# A CPU process's resident set before any model is loaded: torch, transformers, peft and bitsandbytes import
# about 0.9 GiB of libraries and Python objects (benchmarks/results/memory_cpu.json, `baseline_gib`).
CPU_RUNTIME_GIB = 0.89

# Activations autograd keeps per token and encoder layer, in activation elements (bf16 under autocast), as
# multiples of the hidden width H and the MLP width I. A pre-LN layer keeps: both norms' inputs (2H), the
# attention's q, k, v and output (4H), the MLP activation's input and output (2I), plus the inputs of every
# linear layer whose weight trains: all six in full fine-tuning (4H for q/k/v/out, H for fc1, I for fc2), the
# LoRA-targeted q/k/v/out in LoRA (4H, cast copies for LoRA's fp32 A matrices included).
ACTIVATION_UNITS = {"full": (10, 3), "lora": (10, 2)}
# With checkpointing each layer keeps only its input (1H); one layer at a time is recomputed, and its backward
# holds the recomputed activations, their gradients and the recomputation's temporaries (~3 layers' worth).
CHECKPOINT_UNITS = 1
RECOMPUTED_LAYERS = 3
# Backward needs room for gradients of the activations being processed, and allocations are not freed the
# instant they die: peak over the tensors autograd keeps, measured on CPU (memory_cpu.json) and matching the
# commonly observed ~1.2-1.3x on CUDA.
TRANSIENT_FACTOR = 1.3
# bitsandbytes' int8 layers hold more than their int8 weights at peak (outlier columns, row scales, buffers for
# the backward pass): measured, the int8 rows sit 0.16-0.24 GiB above the nf4 rows at ViT-B/16 while their
# weights differ by 0.06 GiB, so about one more byte per quantized weight.
INT8_EXTRA_BYTES_PER_WEIGHT = 1.0


@dataclass
class Estimate:
    """Peak memory of one training setup, in bytes, by part."""

    mode: str
    weights: int
    trainable_params: int
    gradients: int
    optimizer: int
    activations: int
    runtime: int = 0
    parts: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime

    def fits(self, size_gb: int, device: str = "cuda") -> bool:
        need = self.total * (1 + CUDA_FRAGMENTATION) + CUDA_CONTEXT_GIB * GIB if device == "cuda" else self.total
        return need <= size_gb * 1e9


def _load_config(model: str):

    from transformers import AutoConfig

    from .backbones.registry import family_for_name
    from .backbones.shapes import KNOWN_SHAPES, known_config
    from .backbones.weights import resolve_location

    if model in KNOWN_SHAPES:
        return known_config(model)
    own = family_for_name(model)
    if own is not None:
        raise BackboneError(
            f"`mmpeft plan` covers the transformers families ({', '.join(PLANNED_FAMILIES)}: a Hub id, a local "
            f"folder or one of {', '.join(sorted(KNOWN_SHAPES))}); {model!r} is of the {own.name!r} family, "
            "whose towers it cannot yet build from a config. Measure it instead: benchmarks/memory.py, or a short "
            "`mmpeft train train.max_steps=2` run on the card.")
    try:
        return AutoConfig.from_pretrained(resolve_location(model))
    except OSError as err:
        raise BackboneError(f"No config for {model!r} (offline? known without the Hub: {sorted(KNOWN_SHAPES)}): {err}"
                         ) from None


def _meta_model(config, family):
    import torch

    with torch.device("meta"):
        return family.model_class()(config)


def _tokens(config, family, tower: str, text_tokens: int) -> int:
    if tower == "text":
        return text_tokens
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (0 if family.name == "siglip" else 1)  # SigLIP has no class token


def estimate(model: str, mode: str, *, batch: int, text_tokens: int | None = None, bits: int = 4,
             gradient_checkpointing: bool = False, optimizer: str = "adamw", lora_r: int = 16,
             device: str = "cuda") -> Estimate:
    """Peak memory of training `model` (Hub id, local folder or known name) in one of the modes
    `full` (fp32 weights), `lora` (fp32 base), `lora_bf16`, `qlora` (`bits`-bit towers, the rest bf16)."""
    import re

    from torch import nn

    from .backbones import get_family
    from .config import LoraSettings, QuantConfig
    from .models.adapters import tower_targets
    from .quant import matches, skip_patterns

    config = _load_config(model)
    family = get_family(config.model_type)
    meta = _meta_model(config, family)
    text_tokens = text_tokens or min(family.max_text_length(config), 77)
    targets = "|".join(f"(?:{tower_targets(family, t, LoraSettings(r=lora_r), family.num_layers(config, t))})"
                       for t in ("text", "vision"))
    skips = skip_patterns(family, QuantConfig(bits=bits))
    quantized = mode == "qlora"
    base_bytes = 4 if mode in ("full", "lora") else 2
    weights = trainable = lora_params = quant_weights = 0
    for name, module in meta.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        in_tower = family.tower_of(name) is not None
        unused = family.unused_in_full and any(re.fullmatch(family.unused_in_full, f"{name}.{p}") for p, _ in own)
        count = sum(p.numel() for _, p in own)
        if quantized and type(module) is nn.Linear and in_tower and not matches(name, skips):
            q = module.weight.numel()
            # nf4/fp4: half a byte per weight plus an fp32 scale per 64 (double quant: ~0.127 bit); int8: a byte
            weights += q * (4.127 / 8 if bits == 4 else 1 + INT8_EXTRA_BYTES_PER_WEIGHT) + (count - q) * 2
            quant_weights += q
        else:
            weights += count * base_bytes
        if mode == "full" and in_tower and not unused:
            trainable += count
        if mode == "full" and in_tower:
            weights += count * base_bytes  # peft's modules_to_save trains a copy and keeps the frozen original
        if mode != "full" and isinstance(module, nn.Linear) and re.fullmatch(targets, name):
            lora_params += lora_r * (module.in_features + module.out_features)
    trainable += lora_params
    head = 2 * family.embed_dims(config)["text"] * 3 + 3  # the linear concat head the benchmark trains
    trainable += head
    weights += (lora_params + head) * 4  # adapters and head train in fp32 whatever the base
    if mode == "lora":
        # bf16 autocast keeps a bf16 copy of each fp32 weight it multiplies with until the backward pass
        weights += sum(m.weight.numel() for n, m in meta.named_modules()
                       if isinstance(m, nn.Linear) and family.tower_of(n)) * 2
    gradients = trainable * 4
    optimizer_bytes = trainable * (2 if optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8)

    activations = 0
    for tower in ("text", "vision"):
        sub = getattr(config, f"{tower}_config")
        tokens = batch * _tokens(config, family, tower, text_tokens)
        h, i, layers = sub.hidden_size, sub.intermediate_size, family.num_layers(config, tower)
        a_h, a_i = ACTIVATION_UNITS["full" if mode == "full" else "lora"]
        per_layer = tokens * (a_h * h + a_i * i) * 2
        if gradient_checkpointing:
            activations += layers * tokens * h * CHECKPOINT_UNITS * base_bytes + RECOMPUTED_LAYERS * per_layer
        else:
            activations += layers * per_layer
    activations = int(activations * TRANSIENT_FACTOR)
    runtime = int(CPU_RUNTIME_GIB * GIB) if device == "cpu" else 0
    return Estimate(mode=mode, weights=int(weights), trainable_params=trainable, gradients=gradients,
                    optimizer=optimizer_bytes, activations=activations, runtime=runtime,
                    parts={"quantized_weights": quant_weights, "lora_params": lora_params,
                           "text_tokens": text_tokens})


def plan(model: str, *, bits: int = 4, batch: int = 32, text_tokens: int | None = None,
         gradient_checkpointing: bool = False, optimizer: str = "adamw", device: str = "cuda") -> list[Estimate]:
    """Full fine-tuning, LoRA (fp32 and bf16 base) and QLoRA at the same batch and checkpointing setting."""
    kwargs = dict(batch=batch, text_tokens=text_tokens, bits=bits, gradient_checkpointing=gradient_checkpointing,
                  optimizer=optimizer, device=device)
    return [estimate(model, mode, **kwargs) for mode in ("full", "lora", "lora_bf16", "qlora")]


def format_plan(estimates: list[Estimate], *, device: str = "cuda", bits: int = 4) -> str:
    names = {"full": "full fine-tune (fp32)", "lora": "LoRA, fp32 base", "lora_bf16": "LoRA, bf16 base",
             "qlora": f"QLoRA, {bits}-bit towers"}
    sizes = GPU_SIZES_GB if device == "cuda" else ()
    header = "| mode | peak GiB | weights | grads + optimizer | activations | trainable |" + "".join(
        f" {s} GB |" for s in sizes)
    lines = [header, "|" + "---|" * (6 + len(sizes))]
    for e in estimates:
        fits = "".join(" yes |" if e.fits(s, device) else " no |" for s in sizes)
        lines.append(f"| {names[e.mode]} | {e.total / GIB:.2f} | {e.weights / GIB:.2f} | "
                     f"{(e.gradients + e.optimizer) / GIB:.2f} | {e.activations / GIB:.2f} | "
                     f"{e.trainable_params / 1e6:.2f} M |{fits}")
    if device == "cuda":
        lines.append(f"\nA card fits when the peak + {CUDA_FRAGMENTATION:.0%} allocator slack + "
                     f"{CUDA_CONTEXT_GIB} GiB CUDA context stays within it (GB = 1e9 bytes).")
    else:
        lines.append(f"\nCPU peaks include {CPU_RUNTIME_GIB} GiB of imported libraries.")
    return "\n".join(lines)
