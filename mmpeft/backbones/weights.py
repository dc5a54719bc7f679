"""What mmpeft accepts as backbone weights, in one place: safetensors always, pickle files only when the caller
trusts them (and then read with `torch.load(weights_only=True)`), loading-info and tokenizer checks, and the
fingerprint that recognises a checkpoint again."""

from __future__ import annotations

import hashlib
import inspect
import logging
import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError
from .registry import BackboneFamily, resolve_short_name

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve_location(name: str) -> str:
    """Where a model name points: a registered short name's folder, an existing path (`~` expanded), or the name
    as given (a Hub id)."""
    location = resolve_short_name(name) or name
    path = Path(location).expanduser()
    return str(path) if path.exists() else location


def pickle_refused(name: str, has: str) -> BackboneError:
    """The error for a checkpoint whose only weights are a pickle file that the caller did not trust."""
    return BackboneError(
        f"{name!r} has {has}. Pickle weight files can run code when loaded, so mmpeft reads only safetensors. "
        "Use a checkpoint with model.safetensors, or, if you trust this one, set `model.trust_pickle_weights=true` "
        "(load_backbone(..., trust_pickle_weights=True)); it is then read with torch.load(weights_only=True)."
    )


def unpickling_refused(name: str, err: pickle.UnpicklingError) -> BackboneError:
    """torch's message suggests weights_only=False; keep only the line that says what was refused."""
    detail = next((line for line in str(err).splitlines() if "GLOBAL" in line), str(err))
    return BackboneError(f"{name!r}: the pickle weight file holds more than tensors, so it was not loaded "
                         f"(torch.load(weights_only=True) refused it): {detail}")


def weights_error(name: str, location: str, err: OSError, trust_pickle_weights: bool) -> BackboneError:
    """Why no weights file could be read: pickle-only when that is the reason, else transformers' message."""
    folder = Path(location)
    if not trust_pickle_weights:
        found = [f for f in _PICKLE_WEIGHTS if (folder / f).is_file()] if folder.is_dir() else []
        if found:
            return pickle_refused(name, f"only pickle weights ({', '.join(found)}) and no model.safetensors")
        if not folder.is_dir() and "safetensors" in str(err):  # a Hub repo without safetensors weights
            return pickle_refused(name, "no safetensors weights (model.safetensors) on the Hub")
    return BackboneError(f"Cannot load model weights from {name!r}: {err}")


def read_weights(path: str | Path, name: str, trust_pickle_weights: bool) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file; a pickle file only when trusted, and then without arbitrary objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(f"{name!r}: the weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if not trust_pickle_weights:
        raise pickle_refused(name, f"a weights file that is not safetensors ({path.name})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise unpickling_refused(name, err) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k.removeprefix("module."): v for k, v in state.items()}


def from_pretrained_safely(model_class, location: str, name: str, *, revision: str | None, torch_dtype,
                           trust_pickle_weights: bool, **kwargs):
    """`model_class.from_pretrained(..., output_loading_info=True)` under the weights policy above."""
    try:
        return model_class.from_pretrained(
            location, revision=revision, dtype=torch_dtype, output_loading_info=True,
            use_safetensors=None if trust_pickle_weights else True, weights_only=True, **kwargs)
    except OSError as err:  # no weights file of an accepted kind
        raise weights_error(name, location, err, trust_pickle_weights) from None
    except pickle.UnpicklingError as err:  # weights_only refused an object that is not a tensor
        raise unpickling_refused(name, err) from None


def load_transformers_model(model_class, location: str, revision, torch_dtype, trust_pickle_weights: bool,
                            prefix: str):
    """A single transformers tower (dual encoders), without a pooling layer that nothing would train (a `full`
    tower must not carry parameters without gradient); loading info keys named under `prefix`."""
    kwargs = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class).parameters else {}
    model, info = from_pretrained_safely(model_class, location, location, revision=revision, torch_dtype=torch_dtype,
                                         trust_pickle_weights=trust_pickle_weights, **kwargs)
    return model, {kind: [prefix + (k if isinstance(k, str) else k[0]) for k in info.get(kind) or []]
                   for kind in ("missing_keys", "mismatched_keys")}


def check_tokenizer(tokenizer, vocab_size: int, name: str, *, need_pad: bool = False, where: str = "model.name"
                    ) -> None:
    """Refuse a tokenizer smaller than the text tower's vocabulary (offline, `from_pretrained(<hub id>)` can
    silently return a near-empty one), or one without a pad token where batches are padded with it."""
    if len(tokenizer) >= vocab_size and not (need_pad and tokenizer.pad_token_id is None):
        return
    pad = f" (pad token: {tokenizer.pad_token!r})" if need_pad else ""
    raise BackboneError(
        f"The tokenizer loaded for {name!r} has {len(tokenizer)} tokens{pad} but the text tower expects "
        f"{vocab_size}{' and a pad token' if need_pad else ''}. Offline, `from_pretrained(<hub id>)` can silently "
        f"return a near-empty tokenizer: point `{where}` at a local folder that holds the tokenizer files."
    )


def check_loading_info(family: BackboneFamily, name: str, info: dict) -> None:
    """Refuse a checkpoint whose tower weights were missing or mismatched (they would train from random values)."""
    problems = []
    for kind in ("missing_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(kind) or []]
        tower_keys = [k for k in keys if family.tower_of(k)]
        if tower_keys:
            shown = ", ".join(sorted(tower_keys)[:8]) + (" ..." if len(tower_keys) > 8 else "")
            problems.append(f"{len(tower_keys)} tower weight(s) {kind.split('_')[0]} and newly initialised: {shown}")
        other = [k for k in keys if not family.tower_of(k)]
        if other:
            logger.warning("%s: weights outside the towers are newly initialised (unused by mmpeft): %s", name, other)
    if problems:
        raise BackboneError(
            f"Checkpoint {name!r} does not fit the {family.name!r} family ({family.description}): "
            + "; ".join(problems)
            + ". Its towers would train from random weights. Check that the checkpoint is of this family"
            " (e.g. a BLIP captioning checkpoint is not a blip-itm-* retrieval checkpoint) or set `model.family`."
        )


def weights_fingerprint(model: nn.Module, samples_per_tensor: int = 4096,
                        state: dict[str, torch.Tensor] | None = None) -> str:
    """A short hash of the weights: names, shapes and a strided sample of values, rounded to bf16.

    Rounding makes the fingerprint the same whether the backbone is stored in fp32 or bf16; the sample
    keeps it cheap for large models while any re-initialised or other checkpoint still changes it.
    `state` replaces `model.state_dict()`: a quantized model passes the tensors it was quantized from.
    """
    digest = hashlib.sha256()
    tensors = model.state_dict() if state is None else state
    for name in sorted(tensors):
        tensor = tensors[name]  # one at a time: a quantized model's `state` reads them from the checkpoint
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.float32).to(torch.bfloat16)
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]
