"""bitsandbytes quantization of the frozen towers (QLoRA): loading settings, the linear-layer swap, dequantizing.

Transformers families are quantized while loading, through `BitsAndBytesConfig` (`bnb_config`). Towers built by
other libraries (open_clip, timm, torchvision) call `quantize_linears`, which swaps their `nn.Linear` layers for
bitsandbytes layers with the same settings and the same skip list. Everything that is not an `nn.Linear` (embeddings,
norms, convolutions, bare parameters) or that a skip list keeps out stays in the compute dtype (bf16), and
`quantization_report` says which parts those are.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from functools import lru_cache

import torch
from torch import nn

from .config import QuantConfig
from .errors import QuantizationError  # noqa: F401  (raised here; importable from here too)

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "uint8": torch.uint8}


class _KernelsHint(logging.Filter):
    """Holds back bitsandbytes' import-time "Failed to load CPU gemm_4bit_forward ... pip install kernels".

    peft imports bitsandbytes whenever it is installed (`peft/helpers.py`), so every run printed it, quantized or
    not. It only matters to 4-bit layers on the CPU: `check_device` repeats it once when such a run starts.
    """

    held: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if "gemm_4bit_forward" in str(record.msg):
            _KernelsHint.held = record.getMessage()
            return False
        return True


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KernelsHint())



@lru_cache(maxsize=1)
def is_bnb_available() -> bool:
    """True when bitsandbytes can be imported; checked without importing it (the import is slow and loud)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bnb(what: str) -> None:
    if not is_bnb_available():
        raise QuantizationError(f"{what} needs bitsandbytes, which is not installed. Install it with "
                                "`pip install 'mmpeft[quant]'` (or `pip install 'bitsandbytes>=0.45'`).")


def fsdp_active() -> bool:
    """`accelerate launch` with an FSDP config tells its processes so through this variable."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def storage_dtype(quant: QuantConfig) -> torch.dtype:
    """The dtype packed 4-bit weights are stored in; FSDP flattens parameters of one dtype only, so there it
    must be the compute dtype (the other parameters' dtype)."""
    if quant.storage_dtype == "auto":
        return TORCH_DTYPES[quant.compute_dtype] if fsdp_active() and quant.bits == 4 else torch.uint8
    chosen = TORCH_DTYPES[quant.storage_dtype]
    if fsdp_active() and quant.bits == 4 and chosen != TORCH_DTYPES[quant.compute_dtype]:
        raise QuantizationError(
            f"FSDP shards 4-bit weights only when they are stored in the compute dtype, but "
            f"`model.quantization.storage_dtype={quant.storage_dtype}` and `compute_dtype={quant.compute_dtype}`. "
            f"Set `model.quantization.storage_dtype={quant.compute_dtype}` (or `auto`)."
        )
    return chosen


def check_device(device: str | torch.device) -> torch.device:
    """Refuse a device bitsandbytes has no kernels for, before anything is loaded."""
    device = torch.device(device)
    require_bnb("Quantization")
    import bitsandbytes as bnb

    supported = sorted(getattr(bnb, "supported_torch_devices", {"cpu", "cuda"}))
    if device.type == "cpu" and _KernelsHint.held:
        logger.warning("bitsandbytes: %s", _KernelsHint.held)
        _KernelsHint.held = None
    if device.type not in supported:
        raise QuantizationError(f"bitsandbytes {bnb.__version__} cannot run quantized layers on {device.type!r}; it "
                                f"supports {supported}. Train unquantized there (`model.quantization=null`).")
    return device


def skip_patterns(family, quant: QuantConfig) -> list[str]:
    """Module-name patterns kept out of quantization: the family's skip list and the towers not quantized."""
    towers = [m for tower, modules in family.tower_modules.items() if tower not in quant.towers for m in modules]
    return list(family.quant_skip) + [re.escape(m) for m in towers]


def matches(name: str, patterns: list[str]) -> bool:
    """A pattern matches a module and everything under it (transformers' `llm_int8_skip_modules` rule)."""
    return any(re.match(rf"(?:{p})(?:\.|$)", name) for p in patterns)


def bnb_config(quant: QuantConfig, family):
    """The transformers `BitsAndBytesConfig` for a family's checkpoint."""
    require_bnb(f"`model.quantization.bits={quant.bits}`")
    from transformers import BitsAndBytesConfig

    compute = TORCH_DTYPES[quant.compute_dtype]
    skip = skip_patterns(family, quant)
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage_dtype(quant),
        llm_int8_skip_modules=skip,
    )


def _quantized_layer(linear: nn.Linear, quant: QuantConfig, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight.detach().to(TORCH_DTYPES[quant.compute_dtype])
    bias = linear.bias
    if quant.bits == 8:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias is not None,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias is not None,
                                  compute_dtype=TORCH_DTYPES[quant.compute_dtype],
                                  compress_statistics=quant.double_quant, quant_type=quant.quant_type,
                                  quant_storage=storage_dtype(quant), device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=quant.double_quant,
                                         quant_type=quant.quant_type, quant_storage=storage_dtype(quant),
                                         module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(TORCH_DTYPES[quant.compute_dtype]), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes when the weight moves to its device


def keep_trainable_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX-512 BF16, the first forward pass without grad repacks each 4-bit weight into a layout that
    only inference understands: a training step after an evaluation then fails inside bitsandbytes (0.50), and
    layers narrower than one quantization block cannot be repacked at all. Evaluation runs on the usual layout.
    """
    if not is_bnb_available():
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def quantize_linears(model: nn.Module, quant: QuantConfig, skip: list[str]) -> list[str]:
    """Swap every `nn.Linear` whose name no `skip` pattern matches for a bitsandbytes layer, in place.

    The seam for towers that transformers does not load (open_clip, timm, torchvision). Subclasses of
    `nn.Linear` stay: `nn.MultiheadAttention` reads its `out_proj.weight` directly and would break on packed
    weights. Returns the names of the swapped layers.
    """
    require_bnb(f"`model.quantization.bits={quant.bits}`")
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not matches(name, skip):
            model.set_submodule(name, _quantized_layer(module, quant, module.weight.device))
            swapped.append(name)
    keep_trainable_layout(model)
    return swapped


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every floating parameter and buffer that is not a quantized weight in `dtype`."""
    for module in model.modules():
        if _is_bnb_layer(module):
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point():
                setattr(module, name, buf.to(dtype))


def _is_bnb_layer(module: nn.Module) -> bool:
    if not is_bnb_available() or "bitsandbytes" not in type(module).__module__:
        return False
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes layers in `model` (peft's `base_layer`s included)."""
    return [name for name, module in model.named_modules() if _is_bnb_layer(module)]


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every bitsandbytes layer with an `nn.Linear` holding its dequantized weight in `dtype`, in place,
    and drop transformers' record of the quantization so that `save_pretrained` writes a plain checkpoint."""
    from peft.utils.integrations import dequantize_bnb_weight

    replaced = []
    for name, module in list(model.named_modules()):
        if not _is_bnb_layer(module):
            continue
        state = getattr(module, "state", None)
        weight = dequantize_bnb_weight(module.weight, state=state).to(dtype)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
        replaced.append(name)
    for sub in model.modules():
        quantizer = getattr(sub, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(sub)
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if getattr(sub, flag, False):
                setattr(sub, flag, False)
    return replaced


def _plain_name(name: str) -> str:
    """A module name relative to the transformers model, whether or not peft has wrapped it."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".modules_to_save.default", "")


def quantization_report(model: nn.Module, family, quant: QuantConfig) -> dict:
    """Parameter counts of the quantized layers and of each kind of part kept unquantized, with its dtypes."""
    kept: dict[str, dict] = {}
    done = {"modules": 0, "params": 0}
    skip = list(family.quant_skip)
    for name, module in model.named_modules():
        if "lora_" in name or ".original_module" in name:
            continue  # adapters and full towers' frozen originals are not part of the base
        if _is_bnb_layer(module):
            done["modules"] += 1
            done["params"] += module.in_features * module.out_features
            continue
        params = [p for n, p in module.named_parameters(recurse=False) if "lora_" not in n]
        if not params:
            continue
        plain = _plain_name(name)
        if type(module) is nn.Linear:
            tower = family.tower_of(plain)
            reason = ("skip list" if matches(plain, skip) else "outside the towers" if tower is None
                      else "tower not quantized" if tower not in quant.towers else "left unquantized by the loader")
        else:
            reason = "not a plain nn.Linear (embeddings, norms, convolutions, MultiheadAttention, bare parameters)"
        entry = kept.setdefault(reason, {"params": 0, "dtypes": set(), "modules": set()})
        entry["params"] += sum(p.numel() for p in params)
        entry["dtypes"].update(str(p.dtype).removeprefix("torch.") for p in params)
        entry["modules"].add(plain if type(module) is nn.Linear else type(module).__name__)
    for entry in kept.values():
        entry["dtypes"], entry["modules"] = sorted(entry["dtypes"]), sorted(entry["modules"])
    return {"bits": quant.bits, "quantized": done, "kept": kept}


def format_quantization_report(report: dict) -> str:
    """One line per group: quantized layers, then each kind of part kept unquantized and its dtype."""
    q = report["quantized"]
    lines = [f"{report['bits']}-bit: {q['modules']} linear layers, {q['params'] / 1e6:.1f} M weights"]
    for reason, entry in sorted(report["kept"].items(), key=lambda kv: -kv[1]["params"]):
        lines.append(f"kept in {'/'.join(entry['dtypes'])}: {entry['params'] / 1e6:.2f} M params ({reason})")
    return "; ".join(lines)
