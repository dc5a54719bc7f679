"""Save and load a trained model: the stock peft adapter plus (for a classifier) the head and label map, and
provenance. A retrieval model (`task=retrieval`) has no head: its folder is the adapter and `mmpeft.json`."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..backbones import BackboneError, load_backbone
from ..config import Config, config_from_dict
from ..errors import AdapterError, MissingPathError
from .classifier import FusionClassifier, build_classifier
from .integrity import read_weights, verify_weight_hashes, weight_hashes
from .remote import locate_run
from .retrieval import RetrievalModel, build_retrieval_model

FORMAT_VERSION = 1
RUN_RECORD = "mmpeft.json"  # the run record: task, labels, backbone, tower modes, config, versions
HEAD_WEIGHTS = "head.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _versions() -> dict[str, str]:
    names = ("mmpeft", "torch", "transformers", "peft", "accelerate", "bitsandbytes")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def hardware() -> dict:
    """What the run trained on, for the model card: accelerator name and count, CPU, cores."""
    found = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        found.update(accelerator=torch.cuda.get_device_name(0), accelerator_count=torch.cuda.device_count())
    return found


def comparison_origin() -> dict | None:
    """The `mmpeft compare` run this training belongs to (its runner sets `MMPEFT_COMPARISON`), if any."""
    origin = os.environ.get("MMPEFT_COMPARISON")
    return json.loads(origin) if origin else None


def save_adapter(model: FusionClassifier | RetrievalModel, out_dir: str | Path, config: Config, *,
                 backbone_name: str, backbone_revision: str | None, fingerprint: str) -> Path:
    """Write the model's trainable state into `out_dir`, replacing any earlier save file by file.

    Files are written into a temporary folder first and then moved in, so a failed save never leaves a
    half-written adapter where a good one was.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".saving-"))
    try:
        if hasattr(model.backbone, "peft_config"):
            model.backbone.save_pretrained(staging)
            # peft's template card (every field "[More Information Needed]", a local base path) is not ours:
            # `mmpeft card` writes the run's card.
            (staging / "README.md").unlink(missing_ok=True)
        head = getattr(model, "head", None)  # a retrieval model has none
        if head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, staging / HEAD_WEIGHTS)
        manifest = {
            "format_version": FORMAT_VERSION,
            "task": config.task,
            "label_names": getattr(model, "label_names", []),
            "backbone": {"name": backbone_name, "revision": backbone_revision, "family": model.family.name,
                         "fingerprint": fingerprint},
            "tower_modes": model.tower_modes,
            # a retrieval model's fixed temperature, so the run reports the same losses wherever it is loaded
            **({"logit_scale": model.logit_scale} if isinstance(model, RetrievalModel) else {}),
            "config": config.to_dict(),
            "versions": _versions(),
            "git_commit": _git_commit(),
            "hardware": hardware(),
            "comparison": comparison_origin(),
            "files": weight_hashes(staging),  # SHA-256 per weight file, checked by `load_adapter`
        }
        (staging / RUN_RECORD).write_text(json.dumps(manifest, indent=2))
        written = [p.name for p in staging.iterdir()]
        for stale in (*ADAPTER_FILES, HEAD_WEIGHTS):
            if stale not in written and (out_dir / stale).exists():
                (out_dir / stale).unlink()  # an earlier save had an adapter this one has not
        for name in written:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def read_manifest(out_dir: str | Path) -> dict:
    """The `mmpeft.json` of a saved classifier, with a clear error if the folder is not one."""
    path = Path(out_dir) / RUN_RECORD
    if not path.is_file():
        raise MissingPathError(f"{out_dir} is not an mmpeft output folder: {RUN_RECORD} is missing. "
                                "Pass the folder a training run wrote (its `train.output_dir`), or the Hub repo id "
                                "(owner/name) it was pushed to.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is damaged: not valid JSON ({err}). Copy the run folder again.") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path} has format version {manifest.get('format_version')!r}; this mmpeft reads "
                         f"version {FORMAT_VERSION}.")
    return manifest


def backbone_location(out_dir: str | Path, name: str) -> str:
    """A merged folder records its own backbone as "." (it holds the weights), wherever it is moved."""
    return str(out_dir) if name == "." else name


def load_adapter(out_dir: str | Path, *, revision: str | None = None, base: str | None = None,
                 device: str | torch.device = "cpu", trust_pickle_weights: bool = False, is_trainable: bool = False,
                 verify_hashes: bool = True) -> FusionClassifier:
    """Rebuild a saved classifier: backbone, stock peft adapter, head and label map.

    `out_dir` is a run folder or, when no such path exists, a Hub repo id (`owner/name`, at `revision`) that
    `mmpeft push` wrote: it is downloaded into the Hugging Face cache first. The weight files must match the SHA-256
    recorded when they were saved; `verify_hashes=False` accepts files re-saved on purpose (e.g. with stock peft).

    Like peft's `PeftModel.from_pretrained`, every parameter comes back frozen unless `is_trainable=True`
    (which restores the trainable set of the run: LoRA weights, `full` towers, the head). Outputs are
    bit-identical to another model only with identical weights *and* identical `requires_grad` flags: some
    torch kernels (e.g. `nn.MultiheadAttention`'s input projection) take another path for a weight that
    requires grad.

    `base` loads the backbone from another location (e.g. a local copy of the Hub checkpoint); its weights
    must be the ones the adapter was trained on, which the recorded fingerprint checks.
    `trust_pickle_weights` is the caller's decision, never read from the saved folder (which may come from
    someone else): see `load_backbone`.
    """
    folder = locate_run(out_dir, revision)
    model = _load(folder, "classification", base=base, device=device, trust_pickle_weights=trust_pickle_weights,
                  is_trainable=is_trainable, verify_hashes=verify_hashes)
    model.head.load_state_dict(read_weights(folder / HEAD_WEIGHTS))
    return model


def load_retrieval_model(out_dir: str | Path, *, revision: str | None = None, base: str | None = None,
                         device: str | torch.device = "cpu", trust_pickle_weights: bool = False,
                         is_trainable: bool = False, verify_hashes: bool = True) -> RetrievalModel:
    """Rebuild a saved retrieval model (`task=retrieval`): backbone and stock peft adapter; arguments as in
    `load_adapter`."""
    return _load(locate_run(out_dir, revision), "retrieval", base=base, device=device,
                 trust_pickle_weights=trust_pickle_weights, is_trainable=is_trainable, verify_hashes=verify_hashes)


_LOADERS = {"classification": "mmpeft.load_adapter", "retrieval": "mmpeft.load_retrieval_model"}


def saved_lora_config(out_dir: Path):
    """The run's own `adapter_config.json` (target modules, ranks, alphas, `modules_to_save`, ...), so an adapter
    saved when the family presets differed loads exactly; None when the run has no adapter."""
    from peft import LoraConfig

    if not (out_dir / "adapter_config.json").is_file():
        return None
    try:
        config = LoraConfig.from_pretrained(str(out_dir))
    except (ValueError, TypeError, OSError) as err:
        raise AdapterError(f"{out_dir / 'adapter_config.json'} cannot be read as a peft LoRA config ({err}).") from None
    config.inference_mode = False  # trainability is set below, as `is_trainable` asks
    config.base_model_name_or_path = None  # the backbone is the one loaded (fingerprint checked), wherever it is
    return config


def load_recorded_backbone(out_dir: Path, manifest: dict, config: Config, *, base: str | None = None,
                           device: str | torch.device = "cpu", trust_pickle_weights: bool = False):
    """The backbone a run trained on, as its record names it (or from `base`), refused if its fingerprint differs."""
    recorded = manifest["backbone"]
    location = base or backbone_location(out_dir, recorded["name"])
    backbone = load_backbone(location, family=recorded["family"], revision=recorded["revision"],
                             dtype=config.model.dtype, quantization=config.model.quantization,
                             device=device, trust_pickle_weights=trust_pickle_weights,
                             allow_random_init=config.model.allow_random_init)  # as trained: recorded, seeded
    if backbone.fingerprint != recorded["fingerprint"]:
        raise BackboneError(
            f"The adapter in {out_dir} was trained on {recorded['name']!r} (weights fingerprint "
            f"{recorded['fingerprint']}), but {backbone.name!r} has fingerprint {backbone.fingerprint}: "
            "same architecture, different weights. Load it onto the backbone it was trained on."
        )
    return backbone


def _load(out_dir: Path, task: str, *, base: str | None, device: str | torch.device,
          trust_pickle_weights: bool, is_trainable: bool, verify_hashes: bool) -> FusionClassifier | RetrievalModel:
    """The recorded backbone (fingerprint checked) with the saved adapter in it, as the model of `task`."""
    from peft import set_peft_model_state_dict

    manifest = read_manifest(out_dir)
    if verify_hashes:
        verify_weight_hashes(out_dir, manifest.get("files"))
    config = config_from_dict(manifest["config"], strict=False)  # an old run loads as it was trained
    if config.task != task:
        raise AdapterError(f"{out_dir} holds a {config.task} model (`task={config.task}` in its {RUN_RECORD}), not a "
                         f"{task} one: load it with `{_LOADERS[config.task]}`.")
    backbone = load_recorded_backbone(out_dir, manifest, config, base=base, device=device,
                                      trust_pickle_weights=trust_pickle_weights)
    lora_config = saved_lora_config(out_dir)
    if task == "retrieval":
        model = build_retrieval_model(backbone, config, lora_config)
        model.logit_scale = manifest.get("logit_scale", model.logit_scale)  # older runs: the backbone's, as then
    else:
        model = build_classifier(backbone, config, manifest["label_names"], init_head=False, lora_config=lora_config)
    if hasattr(model.backbone, "peft_config"):
        # The model already carries the adapter's structure; fill it with the saved weights (stock layout).
        result = set_peft_model_state_dict(model.backbone, read_weights(out_dir / "adapter_model.safetensors"))
        missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
        if missing or result.unexpected_keys:
            raise AdapterError(f"{out_dir}/adapter_model.safetensors does not match the recorded config: "
                             f"missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}.")
    model.run_folder = out_dir  # the local folder (a Hub snapshot for a repo id)
    if not is_trainable:
        model.requires_grad_(False)
    return model.to(device).eval()
