"""The weight files of a saved run: their SHA-256 in the run record, checked on load, and safetensors headers read
with a message that names the file (a truncated or overwritten file must not load, or predict NaN)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import AdapterError

WEIGHT_FILES = ("adapter_model.safetensors", "head.safetensors")
NO_VERIFY = "`load_adapter(..., verify_hashes=False)` or `--no-verify` on the command line"


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_hashes(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every weight file present in `folder` (what `save_adapter` records in `mmpeft.json`)."""
    folder = Path(folder)
    return {name: sha256_of(folder / name) for name in WEIGHT_FILES if (folder / name).is_file()}


def verify_weight_hashes(folder: str | Path, recorded: dict[str, str] | None) -> None:
    """Refuse weight files whose bytes differ from those `save_adapter` wrote. A run saved before hashes were
    recorded (`recorded` is None) loads as before."""
    if not recorded:
        return
    folder = Path(folder)
    changed = [name for name, digest in recorded.items()
               if (folder / name).is_file() and sha256_of(folder / name) != digest]
    if changed:
        raise AdapterError(
            f"{', '.join(str(folder / n) for n in changed)}: the file's SHA-256 differs from the one recorded in "
            f"{folder / 'mmpeft.json'} when it was saved, so it was damaged or replaced after saving (copy it again "
            "from the original run, or download it again). If you re-saved the adapter yourself (e.g. with stock "
            f"peft's `save_pretrained`) and trust it, accept it with {NO_VERIFY}.")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing, truncated or corrupt file is an `AdapterError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path} is missing: the run folder is incomplete. Copy the whole folder the training "
                           "run wrote (or download it again).")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{path} is damaged or truncated: its safetensors header cannot be read ({err}). Copy "
                           "the file again from the original run folder, or download it again.") from None
