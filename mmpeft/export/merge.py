"""Fold a trained adapter into its backbone: a standalone transformers folder plus the head.

A quantized (QLoRA) backbone is dequantized first, the adapter merged in full precision, and the result
optionally re-quantized. Merging straight into 4-bit or 8-bit weights is refused: the LoRA update is far smaller
than one quantization step, so rounding the sum back to 4 bits throws most of it away.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from ..backbones import get_family, load_backbone
from ..config import Config, QuantConfig
from ..errors import (
    MergeError,  # noqa: F401  (raised here; importable from here too)
    PathExistsError,
)
from ..models.adapters import peft_wrap
from ..models.classifier import FusionClassifier, build_classifier
from ..models.saving import HEAD_WEIGHTS, load_adapter, read_manifest, save_adapter
from ..quant import TORCH_DTYPES, dequantize_linears, quantized_modules
from .inference import encode_batch

REPORT = "merge_report.json"
PROBE_TEXTS = ["a photo of a cat", "a red car parked on a wet street", "two dogs playing in the snow",
               "an empty room", "what a lovely day", "this is the worst film I have seen"]



def merge_adapter(peft_model: nn.Module) -> nn.Module:
    """peft's `merge_and_unload`, refused when the adapter sits on quantized weights."""
    quantized = quantized_modules(peft_model)
    if quantized:
        raise MergeError(
            f"Refusing to merge LoRA into quantized weights ({len(quantized)} bitsandbytes layers, e.g. "
            f"{quantized[0]}). peft would dequantize each weight, add the LoRA update and round the sum back to "
            "4/8 bits; the update is much smaller than one quantization step, so most of what training learned "
            "is rounded away. Dequantize first: `mmpeft merge OUT_DIR --to MERGED_DIR` does (dequantize, merge in "
            "full precision, and `--requantize` to quantize the merged weights again)."
        )
    if not hasattr(peft_model, "merge_and_unload"):
        return peft_model  # no adapter: every tower was frozen
    return peft_model.merge_and_unload()


def to_full_precision(model: FusionClassifier) -> None:
    """Dequantize a QLoRA classifier's base weights and put every parameter in float32, adapter kept unmerged.

    peft's quantized LoRA layers only work on bitsandbytes weights, so the adapter is taken off, the base
    dequantized, and the same adapter (config and weights) put back on the float32 base.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    peft_model = model.backbone
    if hasattr(peft_model, "peft_config"):
        config = copy.deepcopy(peft_model.peft_config["default"])
        state = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        base = peft_model.unload()
        dequantize_linears(base, torch.float32)
        base.float()
        peft_model = peft_wrap(base, config)
        set_peft_model_state_dict(peft_model, state)
    else:
        dequantize_linears(peft_model, torch.float32)
        peft_model.float()
    model.backbone = peft_model
    model.float()


def probe_batch(model: FusionClassifier, n: int = 6) -> dict[str, torch.Tensor]:
    """Fixed texts and seeded noise images: the inputs both sides of a merge are compared on."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]
    return encode_batch(model, images, PROBE_TEXTS[:n])


@torch.no_grad()
def _logits(model: FusionClassifier, batch: dict) -> torch.Tensor:
    model.eval()
    return model(**batch).float().cpu()


def merged_config(config: Config, dtype: str) -> Config:
    """The recorded config of a merged folder: its own weights, nothing left to adapt."""
    merged = copy.deepcopy(config)
    merged.model.name = "."
    merged.model.revision = None
    merged.model.dtype = dtype
    merged.model.quantization = None  # a re-quantized folder carries its quantization in config.json
    merged.model.gradient_checkpointing = False
    merged.model.text.mode = merged.model.vision.mode = "frozen"
    return merged


def classifier_from(folder: Path, config: Config, label_names: list[str], head_state: dict,
                    quantization: QuantConfig | None = None) -> FusionClassifier:
    backbone = load_backbone(str(folder), dtype=config.model.dtype, quantization=quantization)
    classifier = build_classifier(backbone, config, label_names)
    # A prompt head over a text tower that trained re-encoded its prompts every step; merged, the tower is
    # frozen and the class embeddings are encoded once from it (which build_classifier just did).
    result = classifier.head.load_state_dict(head_state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"class_embeds"}:
        raise MergeError(f"The saved head does not fit the merged classifier: {result}.")
    classifier.source, classifier.config = backbone, config
    return classifier


def written_files(folder: Path) -> list[str]:
    """Every file under `folder`, as paths relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def check_destination(out_dir: Path, merged_dir: Path, *, overwrite: bool, report: str = REPORT,
                      writer: str = "mmpeft merge") -> None:
    """Refuse a destination whose replacement would lose anything: the source run, or files merge did not write.

    Both paths are resolved. `--overwrite` replaces only a folder an earlier `writer` wrote, and only if it holds
    nothing but the files it recorded in its `report` (merge: `merge_report.json`).
    """
    if merged_dir == out_dir or out_dir.is_relative_to(merged_dir) or merged_dir.is_relative_to(out_dir):
        where = ("is" if merged_dir == out_dir else "contains" if out_dir.is_relative_to(merged_dir)
                 else "lies inside")
        raise PathExistsError(f"--to {merged_dir} {where} the run folder {out_dir}; replacing it would delete the "
                              "adapter, checkpoints and metrics. Choose a folder outside the run, e.g. "
                              f"{out_dir.parent / (out_dir.name + '-merged')}.")
    if merged_dir.exists() and not merged_dir.is_dir():
        raise PathExistsError(f"--to {merged_dir} is a file, not a folder; choose a folder.")
    if not merged_dir.exists() or not any(merged_dir.iterdir()):
        return
    if not overwrite:
        raise PathExistsError(f"{merged_dir} is not empty; choose another folder or pass --overwrite.")
    try:
        recorded = set(json.loads((merged_dir / report).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PathExistsError(f"--overwrite: {merged_dir} is not a folder `{writer}` wrote (no list of its files "
                              f"in {report}); it is left as it is. Choose another folder, or empty it yourself.") from None
    foreign = sorted(set(written_files(merged_dir)) - recorded)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PathExistsError(f"--overwrite: {merged_dir} holds {len(foreign)} file(s) `{writer}` did not write "
                              f"({shown}); it is left as it is. Move them out or choose another folder.")


def replace_folder(new: Path, destination: Path, aside: Path) -> None:
    """Put `new` at `destination`: the old folder is moved aside first and deleted only once `new` is in place."""
    if destination.exists():
        destination.rename(aside)
    try:
        new.rename(destination)
    except OSError:
        if aside.exists():
            aside.rename(destination)
        raise


def merge(out_dir: str | Path, merged_dir: str | Path, *, requantize: bool = False, dtype: str = "float32",
          overwrite: bool = False) -> dict:
    """Merge the adapter in `out_dir` into its backbone and write a standalone folder to `merged_dir`.

    The folder loads with stock transformers (`CLIPModel.from_pretrained`, `pipeline(...)`: weights, config,
    tokenizer and image processor) and with `mmpeft.load_adapter` (head, label map). Returns the report also
    written to `merged_dir/merge_report.json`: the largest logit difference against the unmerged model computed
    in float32, after the full-precision merge and, with `requantize`, after quantizing again.
    """
    out_dir, merged_dir = Path(out_dir).resolve(), Path(merged_dir).resolve()
    if dtype not in ("float32", "bfloat16", "float16"):
        raise MergeError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}.")
    manifest = read_manifest(out_dir)
    family = get_family(manifest["backbone"]["family"])
    if family.load is not None:
        raise MergeError(f"`mmpeft merge` writes a transformers model folder; the {family.name!r} backbone of "
                         f"{out_dir} is not a transformers model. Load it with `mmpeft.load_adapter` and merge "
                         "with peft's `merge_and_unload()` in Python instead.")
    check_destination(out_dir, merged_dir, overwrite=overwrite)  # before any work, as the checks above
    model = load_adapter(out_dir)
    source, config = model.source, model.config
    quant = source.quantization
    if requantize and quant is None:
        raise MergeError(f"--requantize: the adapter in {out_dir} was not trained on a quantized backbone; there "
                         "is no quantization to restore.")
    batch = probe_batch(model)
    report: dict = {"source": str(out_dir), "backbone": manifest["backbone"], "dtype": dtype,
                    "quantization": dataclasses.asdict(quant) if quant else None, "probe_examples": len(batch["input_ids"])}
    as_trained = _logits(model, batch)
    to_full_precision(model)
    reference = _logits(model, batch)  # the unmerged model, same weights, float32 arithmetic
    if quant:
        report["max_abs_diff_dequantized_vs_as_trained"] = float((reference - as_trained).abs().max())
    merged_base = merge_adapter(model.backbone)
    head_state = load_file(out_dir / HEAD_WEIGHTS)

    merged_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling of the resolved destination: on the same file system (renames are atomic), never inside it.
    staging = Path(tempfile.mkdtemp(dir=merged_dir.parent, prefix=f".{merged_dir.name}-merging-"))
    try:
        full = staging / "full"
        merged_base.to(TORCH_DTYPES[dtype])
        merged_base.config.dtype = TORCH_DTYPES[dtype]
        merged_base.save_pretrained(full)
        source.tokenizer.save_pretrained(full)
        source.image_processor.save_pretrained(full)
        full_config = merged_config(config, dtype)
        merged = classifier_from(full, full_config, model.label_names, head_state)
        report["max_abs_diff_full_precision"] = float((_logits(merged, batch) - reference).abs().max())
        final, final_config = full, full_config
        if requantize:
            requant_config = merged_config(config, quant.compute_dtype)  # the other parts as in training
            quantized = classifier_from(full, requant_config, model.label_names, head_state, quantization=quant)
            report["max_abs_diff_requantized"] = float((_logits(quantized, batch) - reference).abs().max())
            final = staging / "requantized"
            quantized.base.save_pretrained(final)
            source.tokenizer.save_pretrained(final)
            source.image_processor.save_pretrained(final)
            final_config = requant_config
        # Record the fingerprint the folder will be loaded with (a pre-quantized checkpoint hashes its files).
        check = classifier_from(final, final_config, model.label_names, head_state) if requantize else merged
        save_adapter(check, final, final_config, backbone_name=".", backbone_revision=None,
                     fingerprint=check.source.fingerprint)
        report["files"] = sorted([*written_files(final), REPORT])
        (final / REPORT).write_text(json.dumps(report, indent=2))
        replace_folder(final, merged_dir, staging / "previous")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
