"""Training-state checkpoints through `accelerator.save_state`: atomic, hashed, pruned, resumable.

accelerate writes the optimizer, scheduler and RNG states as pickles, which can run code when loaded. mmpeft
therefore only loads a checkpoint whose files match the SHA-256 hashes in the manifest it wrote itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..errors import CheckpointError, TrainingError

CHECKPOINTS = "checkpoints"
CHECKPOINT_INDEX = "mmpeft_checkpoint.json"
_PREFIX = "step-"


@dataclass
class LoopState:
    """Where the loop is, beyond what accelerate saves: the data position and the best-so-far bookkeeping."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` already consumed on each process
    samples: int = 0
    train_seconds: float = 0.0
    skipped_nonfinite: int = 0
    best: float | None = None
    best_step: int | None = None
    misses: int = 0
    history: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # the config keys a resume must match (see `resume_settings`)


# Keys that may change between a run and its resume without changing what it computes.
RESUME_FREE = ("train.resume_from", "train.overwrite", "train.progress", "train.tracker", "train.log_every",
               "train.checkpoint_every", "train.keep_checkpoints", "train.output_dir", "data.num_workers",
               "data.eval_batch_size", "train.project", "train.run_name")


def resume_settings(flat_config: dict) -> dict:
    """The flattened config minus the keys that may differ on resume."""
    return {k: v for k, v in flat_config.items() if k not in RESUME_FREE}


def check_same_settings(path: Path, saved: dict, current: dict, defaults: dict | None = None) -> None:
    """A resume under other settings would not continue the same run: name what differs.

    A key the checkpoint does not know (added to mmpeft after it was written) is no difference while it has its
    default value, so a newer mmpeft resumes older checkpoints.
    """
    defaults = defaults or {}
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k)
                    and not (k not in saved and k in defaults and current.get(k) == defaults[k]))
    if saved and differ:
        shown = ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {current.get(k)!r})" for k in differ[:8])
        raise CheckpointError(f"Checkpoint {path} was written with other settings: {shown}. Resume with the "
                              "config of the run that wrote it, or start a new run.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"{_PREFIX}{step:07d}"


def save_checkpoint(accelerator, output_dir: str | Path, state: LoopState, extra_files: dict | None = None,
                    keep: int | None = None) -> Path:
    """Save the full training state as `checkpoints/step-N`, atomically, then keep the newest `keep`.

    Every process takes part (accelerate saves per-process RNG states); the main process writes the
    manifest and renames the finished folder into place, so a crash or a full disk never leaves a
    half-written checkpoint under a final name, and never touches the previous one.
    `extra_files` maps file names to callables that write them into the folder (main process only).
    """
    final = checkpoint_dir(output_dir, state.step)
    staging = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        if accelerator.is_main_process:
            for name, write in (extra_files or {}).items():
                write(staging / name)
            files = {p.relative_to(staging).as_posix(): _sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
            (staging / CHECKPOINT_INDEX).write_text(json.dumps({"state": asdict(state), "files": files}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (staging folders of interrupted saves are ignored)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / CHECKPOINT_INDEX).is_file()]
    return sorted(done, key=lambda p: p.name)


def resolve_resume(output_dir: str | Path, resume_from: str) -> Path:
    """`latest` becomes the newest finished checkpoint of `output_dir`; a path is taken as given."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"`train.resume_from=latest` but {Path(output_dir) / CHECKPOINTS} holds no "
                                  "finished checkpoint. Set `train.checkpoint_every` to write some.")
        return found[-1]
    path = Path(resume_from)
    if not (path / CHECKPOINT_INDEX).is_file():
        raise CheckpointError(f"{path} is not an mmpeft checkpoint ({CHECKPOINT_INDEX} is missing); pass a "
                              f"`{CHECKPOINTS}/{_PREFIX}N` folder of a run or `latest`.")
    return path


def verify_checkpoint(path: Path) -> LoopState:
    """Check every file against the manifest's hashes before any pickle in it is loaded."""
    manifest = json.loads((path / CHECKPOINT_INDEX).read_text())
    problems = []
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif _sha256(file) != expected:
            problems.append(f"{name} was changed after mmpeft wrote it")
    unexpected = [p.relative_to(path).as_posix() for p in path.rglob("*")
                  if p.is_file() and p.name != CHECKPOINT_INDEX and p.relative_to(path).as_posix() not in manifest["files"]]
    problems += [f"{name} was not written by mmpeft" for name in unexpected]
    if problems:
        raise CheckpointError(f"Refusing to load checkpoint {path}: " + "; ".join(problems)
                              + ". Its pickled states could run code; resume from a checkpoint mmpeft wrote.")
    return LoopState(**manifest["state"])


def save_trainable_only(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
    """accelerate save_state hook: checkpoints hold trainable weights only, not a copy of the frozen backbone."""
    for i, model in enumerate(models):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in weights[i].items() if k in trainable}


def load_state_checked(accelerator, checkpoint: Path, model: nn.Module) -> None:
    """`accelerator.load_state(strict=False)` drops keys that do not match; refuse a checkpoint whose weights are
    not exactly the model's trainable ones (a renamed module would otherwise resume nothing, silently)."""
    from safetensors import safe_open

    weights = checkpoint / "model.safetensors"
    if weights.is_file():
        with safe_open(weights, "pt") as f:
            saved = set(f.keys())
        trainable = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        if saved != trainable:
            missing, unexpected = sorted(trainable - saved), sorted(saved - trainable)
            raise TrainingError(f"Checkpoint {checkpoint} does not fit this model: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}. It was written for another model layout; resume "
                                "with the mmpeft version and config that wrote it, or start a new run.")
    accelerator.load_state(str(checkpoint), strict=False)
