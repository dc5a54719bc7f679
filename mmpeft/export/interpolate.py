"""WiSE-FT (Wortsman et al., 2022): the weights of a fine-tuned run moved part of the way back to its start,
θ(α) = (1 − α)·θ₀ + α·θ₁, written as a run folder that loads like any other.

Per part: a plain LoRA tower's update is linear in its B matrix, so scaling B by α is exactly the interpolation
and the result stays a small adapter on the same backbone. DoRA (its magnitude renormalises W + BA) and `full`
towers are not linear in anything the adapter stores, so they are merged first and the merged weights
interpolated with the pretrained backbone, reloaded from the run's record; the result is a merged folder like
`mmpeft merge` writes. Frozen towers are unchanged. Only the `prompt` head has a starting point: the zero-shot
classifier (class-prompt embeddings of the pretrained text tower, the backbone's logit scale), rebuilt from the
recorded backbone, labels and prompt template; other heads keep their fine-tuned weights, and the record says so.

α must lie in [0, 1]: α = 0 is the zero-shot model, α = 1 the fine-tuned one; beyond them is extrapolation,
which WiSE-FT does not study and this refuses. A QLoRA adapter (plain LoRA on 4/8-bit weights) is scaled in
place and stays QLoRA; DoRA over quantized weights is dequantized first, as `mmpeft merge` does.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from ..backbones import get_family
from ..config import Config
from ..errors import MergeError
from ..models.classifier import build_classifier
from ..models.integrity import read_weights
from ..models.saving import (
    HEAD_WEIGHTS,
    RUN_RECORD,
    load_adapter,
    load_recorded_backbone,
    read_manifest,
    save_adapter,
    saved_lora_config,
)
from ..quant import dequantize_linears
from .merge import (
    check_destination,
    classifier_from,
    merge_adapter,
    merged_config,
    replace_folder,
    to_full_precision,
    written_files,
)

REPORT = "interpolate_report.json"
SCALED, MERGED = "lora delta scaled by alpha", "merged, then weights interpolated with the pretrained backbone"


def check_alpha(alpha: float) -> float:
    """α as a float in [0, 1], or a `MergeError` saying why not."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise MergeError(f"--alpha must be a number in [0, 1], got {alpha!r}.") from None
    if not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise MergeError(f"--alpha must lie in [0, 1] (0: the zero-shot model, 1: the fine-tuned one), got {alpha}. "
                         "WiSE-FT interpolates; values outside extrapolate past either end and are refused.")
    return alpha


def tower_plan(tower_modes: dict[str, str], use_dora: bool) -> dict[str, str]:
    """How each tower is interpolated: unchanged (frozen), LoRA scaled, or merged and interpolated."""
    how = {"frozen": "unchanged (frozen)", "lora": MERGED if use_dora else SCALED, "full": MERGED}
    return {tower: how[mode] + (" (DoRA)" if mode == "lora" and use_dora else "")
            for tower, mode in tower_modes.items()}


def zero_shot_head(backbone, config: Config, label_names: list[str]) -> dict[str, torch.Tensor]:
    """The prompt head as built on the pretrained towers: class embeddings from the prompts, the backbone's scale."""
    frozen = copy.deepcopy(config)
    frozen.model.text.mode = frozen.model.vision.mode = "frozen"  # a static head: the prompts encoded once
    frozen.model.gradient_checkpointing = False
    model = build_classifier(backbone, frozen, label_names)
    return {k: v.detach().clone() for k, v in model.head.state_dict().items()}


def interpolate_head(tuned: dict[str, torch.Tensor], start: dict[str, torch.Tensor] | None, alpha: float,
                     where: Path) -> dict[str, torch.Tensor]:
    """Each tensor of the fine-tuned head moved towards its zero-shot value; unchanged without a start."""
    if start is None:
        return tuned
    missing = sorted(set(tuned) - set(start))
    if missing:
        raise MergeError(f"{where / HEAD_WEIGHTS} has {missing}, which the zero-shot prompt head lacks; the head "
                         "does not fit the recorded config.")
    return {k: torch.lerp(start[k].to(v), v, alpha) for k, v in tuned.items()}


def interpolate_state(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float,
                      where: Path) -> dict[str, torch.Tensor]:
    """(1 − α)·θ₀ + α·θ₁ tensor by tensor (`lerp`: equal tensors, e.g. frozen towers, stay bit-exact)."""
    missing = sorted(set(tuned) - set(start))
    if missing:
        raise MergeError(f"The merged model of {where} has weights the recorded backbone lacks ({missing[:5]}); "
                         "it cannot be interpolated with it.")
    return {k: torch.lerp(start[k].to(v), v, alpha) if v.is_floating_point() else v for k, v in tuned.items()}


def _scale_lora(peft_model, alpha: float) -> int:
    """Multiply every LoRA B matrix by α: W + α·(s·BA), the interpolated weight of a plain LoRA layer."""
    scaled = 0
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name or ".lora_embedding_B." in name:
                param.mul_(alpha)
                scaled += 1
    return scaled


def _write_scaled(run_dir: Path, manifest: dict, alpha: float, prompt: bool, staging: Path) -> Path:
    """Plain LoRA / frozen towers: the same backbone with α·B and the interpolated head, as an adapter folder."""
    model = load_adapter(run_dir)
    start = zero_shot_head(load_recorded_backbone(run_dir, manifest, model.config), model.config,
                           model.label_names) if prompt else None
    _scale_lora(model.backbone, alpha)
    tuned = read_weights(run_dir / HEAD_WEIGHTS)
    model.head.load_state_dict(interpolate_head(tuned, start, alpha, run_dir))
    recorded = manifest["backbone"]
    folder = staging / "scaled"
    save_adapter(model, folder, model.config, backbone_name=recorded["name"], backbone_revision=recorded["revision"],
                 fingerprint=recorded["fingerprint"])
    return folder


def _write_merged(run_dir: Path, manifest: dict, alpha: float, prompt: bool, staging: Path) -> Path:
    """DoRA / full towers: merged weights interpolated with the reloaded pretrained backbone, as a merged folder."""
    model = load_adapter(run_dir)
    config, source = model.config, model.source
    pretrained = load_recorded_backbone(run_dir, manifest, config)
    start = zero_shot_head(pretrained, config, model.label_names) if prompt else None
    to_full_precision(model)
    tuned = merge_adapter(model.backbone)
    if pretrained.quantization is not None:
        dequantize_linears(pretrained.model, torch.float32)  # the weights the adapter was trained on, in float32
    pretrained.model.float()
    tuned.load_state_dict(interpolate_state(pretrained.model.state_dict(), tuned.state_dict(), alpha, run_dir))
    del pretrained
    head = interpolate_head(read_weights(run_dir / HEAD_WEIGHTS), start, alpha, run_dir)
    folder = staging / "merged"
    tuned.config.dtype = torch.float32
    tuned.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    source.image_processor.save_pretrained(folder)
    folder_config = merged_config(config, "float32")
    # A text tower that trained re-encoded the prompts every step; frozen here, they are encoded once from the
    # interpolated tower (classifier_from does), which is the prompt head of θ(α).
    merged = classifier_from(folder, folder_config, model.label_names, head)
    save_adapter(merged, folder, folder_config, backbone_name=".", backbone_revision=None,
                 fingerprint=merged.source.fingerprint)
    return folder


def interpolate(run_dir: str | Path, out_dir: str | Path, alpha: float, *, overwrite: bool = False) -> dict:
    """Write the WiSE-FT model θ(α) of the classifier run in `run_dir` into `out_dir`; returns the record of what
    was interpolated how (also in `out_dir/mmpeft.json` under "interpolated" and in `interpolate_report.json`)."""
    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir).resolve()
    alpha = check_alpha(alpha)
    manifest = read_manifest(run_dir)
    if manifest["task"] != "classification":
        raise MergeError(f"{run_dir} holds a {manifest['task']} model; `mmpeft interpolate` takes a classifier run.")
    if manifest["backbone"]["name"] == ".":
        raise MergeError(f"{run_dir} is a merged folder: its weights are its own, with no pretrained starting point "
                         "recorded. Interpolate the run it was merged (or interpolated) from instead.")
    lora_config = saved_lora_config(run_dir)
    plan = tower_plan(manifest["tower_modes"], bool(lora_config and lora_config.use_dora))
    full_weights = MERGED in "".join(plan.values())
    family = get_family(manifest["backbone"]["family"])
    if full_weights and family.load is not None:
        raise MergeError(f"{run_dir} has a DoRA or `full` tower on a {family.name!r} backbone, which is not a "
                         "transformers model: its interpolated weights cannot be written as a model folder. "
                         "Plain LoRA towers interpolate on any backbone.")
    check_destination(run_dir, out_dir, overwrite=overwrite, report=REPORT, writer="mmpeft interpolate")
    head_type = manifest["config"]["head"]["type"]
    prompt = head_type == "prompt"
    plan["head"] = ("interpolated with the zero-shot classifier (prompt embeddings, logit scale)" if prompt else
                    f"kept fine-tuned (a {head_type} head has no zero-shot starting point)")
    record = {"alpha": alpha, "source": str(run_dir), **plan}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-interpolating-"))
    try:
        write = _write_merged if full_weights else _write_scaled
        folder = write(run_dir, manifest, alpha, prompt, staging)
        written = json.loads((folder / RUN_RECORD).read_text())
        written["interpolated"] = record
        (folder / RUN_RECORD).write_text(json.dumps(written, indent=2))
        report = {**record, "files": sorted([*written_files(folder), REPORT])}
        (folder / REPORT).write_text(json.dumps(report, indent=2))
        replace_folder(folder, out_dir, staging / "previous")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record
