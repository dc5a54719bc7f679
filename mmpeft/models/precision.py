"""What the run's mixed precision changes in the backbone before the classifier is built on it.

Under bf16 autocast every matrix product of a frozen weight runs in bf16 anyway: autocast casts the fp32 weight
at each call. Two settings follow from that, each `auto` by
default and each recorded in `metrics.json["precision"]` with the reason:

* `model.dtype=auto` stores the backbone in bf16 when the run trains under bf16, no tower trains in full (their
  weights must stay fp32 for the optimizer), nothing is quantized and no FSDP / DeepSpeed flattens parameters
  (those need one dtype per flat parameter). LoRA weights and the head are built afterwards in fp32, and every
  trainable parameter is checked to be fp32. It saves the per-call casts and half the frozen weights' memory.
* `model.attn_implementation=auto` runs transformers towers with eager attention on the CPU under bf16: torch's
  CPU flash-attention backward in bf16 took 0.12 s of a 0.89 s B/32 step (`benchmarks/profile_step.py --shape b32
  --precision bf16`), and B/32 / B/16 steps ran faster eager in this session's in-process A/B; fp32 showed no
  difference, so SDPA everywhere else (CUDA, fp32 on the CPU). It is a training choice: `mmpeft eval` / `predict`
  load the adapter in fp32 and keep SDPA. Under bf16 autocast the forward alone shows no winner
  (`benchmarks/eval_attention.py`, B/32, batch 32: eager / SDPA per pair 0.90-1.05, medians 2.35 vs 2.43 s).
"""

from __future__ import annotations

import torch
from torch import nn


def transformers_models(root: nn.Module) -> list[nn.Module]:
    """Every transformers model inside `root` whose attention implementation can be switched."""
    from transformers import PreTrainedModel

    return [m for m in root.modules() if isinstance(m, PreTrainedModel) and hasattr(m, "set_attn_implementation")]


def set_attention(root: nn.Module, implementation: str) -> list[tuple[nn.Module, str]]:
    """Switch every transformers model inside `root` to `implementation`; (model, its implementation before) for
    each one switched, which `restore_attention` takes."""
    switched = []
    for model in transformers_models(root):
        before = model.config._attn_implementation
        if before != implementation:
            model.set_attn_implementation(implementation)
            switched.append((model, before))
    return switched


def restore_attention(switched: list[tuple[nn.Module, str]]) -> None:
    """Undo `set_attention`: each model back to the implementation it had."""
    for model, before in switched:
        if before:
            model.set_attn_implementation(before)


def bf16_storage_blocker(model_cfg, mixed_precision: str, sharded: bool) -> str | None:
    """Why the backbone stays in its loaded dtype under `model.dtype=auto`, or None when it is stored in bf16."""
    if model_cfg.dtype != "auto":
        return f"model.dtype={model_cfg.dtype} is set"
    if mixed_precision != "bf16":
        return f"the run trains under mixed precision {mixed_precision!r}, not bf16"
    if model_cfg.quantization is not None:
        return "the towers are quantized (their other parts already use the compute dtype)"
    full = [t for t in ("text", "vision") if getattr(model_cfg, t).mode == "full"]
    if full:
        return f"the {' and '.join(full)} tower trains in full (model.{full[0]}.mode=full): its weights stay fp32"
    if sharded:
        return "FSDP / DeepSpeed flatten parameters of one dtype"
    return None


def fit_backbone_to_precision(backbone, model_cfg, mixed_precision: str, device: torch.device,
                              sharded: bool = False) -> dict:
    """Apply `model.dtype=auto` and `model.attn_implementation` to a freshly loaded backbone (see the module
    docstring); returns what was chosen and why, for metrics.json."""
    blocker = bf16_storage_blocker(model_cfg, mixed_precision, sharded)
    if blocker is None:
        backbone.model.to(torch.bfloat16)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in backbone.model.parameters() if p.is_floating_point()})
    weights = (f"{'/'.join(dtypes)}: "
               + ("stored in bf16 under bf16 autocast; LoRA and head in fp32" if blocker is None else blocker))
    return {"weights": weights, "attention": _fit_attention(backbone.model, model_cfg.attn_implementation,
                                                           mixed_precision, device)}


def _fit_attention(model: nn.Module, choice: str, mixed_precision: str, device: torch.device) -> str:
    if not transformers_models(model):
        return "as loaded: no transformers tower"
    if choice == "auto":
        if device.type != "cpu" or mixed_precision != "bf16":
            return "as loaded (sdpa where the family supports it)"
        set_attention(model, "eager")
        return "eager: bf16 on the CPU, where flash attention's backward is the slower kernel"
    set_attention(model, choice)
    return f"{choice}: model.attn_implementation={choice}"


def keep_trainable_fp32(model: nn.Module) -> int:
    """Cast any trainable floating parameter that is not fp32 (built from a bf16 backbone) to fp32; how many."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast
