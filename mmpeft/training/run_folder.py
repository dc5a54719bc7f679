"""The output folder of a training run: refuse to train over an earlier run unless asked, and when asked
(`train.overwrite=true`) remove exactly what an earlier run wrote there, nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import PathExistsError
from ..models.saving import ADAPTER_FILES, HEAD_WEIGHTS, RUN_RECORD
from .checkpoints import CHECKPOINTS, list_checkpoints
from .evaluation import PER_EXAMPLE

METRICS = "metrics.json"
TEST_PREDICTIONS = "test_predictions.jsonl"  # index, label and prediction of every test example
LOGS = "logs"
RUN_FILES = (RUN_RECORD, *ADAPTER_FILES, HEAD_WEIGHTS, METRICS, TEST_PREDICTIONS)  # what a training run writes


def earlier_run(out: Path) -> list[str]:
    """What an earlier training run left in `out` (files and folders mmpeft writes), by name."""
    found = [name for name in RUN_FILES if (out / name).is_file()]
    checkpoints = _checkpoint_folders(out)
    if checkpoints:
        found.append(f"{CHECKPOINTS}/ ({len(checkpoints)} checkpoint{'s' if len(checkpoints) > 1 else ''})")
    return found


def _checkpoint_folders(out: Path) -> list[Path]:
    """Finished checkpoints and the staging folders of interrupted saves: both written by mmpeft."""
    root = out / CHECKPOINTS
    staging = [p for p in root.glob(".tmp-step-*") if p.is_dir()] if root.is_dir() else []
    return list_checkpoints(out) + staging


def prepare_output_dir(out_dir: str | Path, *, overwrite: bool, resume: bool, project: str) -> tuple[Path, str | None]:
    """The output folder, ready for a run; and a line saying what an overwrite removed (None if nothing).

    An earlier run (adapter, head, run record, metrics or checkpoints) is refused unless the run resumes it or
    `overwrite` is set. An overwrite removes only those files, the checkpoint folders mmpeft wrote and the
    tracker's log folder of this project, so a folder that also holds other things (e.g. `.`) keeps them, and so
    does the `log.txt` a comparison writes into a run folder before training starts.
    """
    out = Path(out_dir)
    found = earlier_run(out) if out.is_dir() else []
    if not found or resume:
        return out, None
    if not overwrite:
        raise PathExistsError(f"{out} already holds a training run ({', '.join(found)}). Choose another "
                              "`train.output_dir`, set `train.resume_from=latest` to continue it, or "
                              "`train.overwrite=true` to replace it (only what mmpeft wrote there is removed).")
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for folder in _checkpoint_folders(out):
        shutil.rmtree(folder)
    if (out / CHECKPOINTS).is_dir() and not any((out / CHECKPOINTS).iterdir()):
        (out / CHECKPOINTS).rmdir()
    logs = out / LOGS / project
    if logs.is_dir():
        shutil.rmtree(logs)
        found.append(f"{LOGS}/{project}/")
    return out, f"train.overwrite: removed the earlier run's {', '.join(found)} from {out}"


def kept_in(out: Path) -> str:
    """What a stopped run leaves that is worth keeping, for its error message."""
    kept = []
    if all((out / name).is_file() for name in (RUN_RECORD, HEAD_WEIGHTS)) or (out / ADAPTER_FILES[1]).is_file():
        kept.append(f"the best adapter so far in {out}")
    checkpoints = list_checkpoints(out)
    if checkpoints:
        kept.append(f"the last checkpoint {checkpoints[-1]}")
    return "Kept: " + " and ".join(kept) + "." if kept else f"Nothing was saved yet in {out} (no evaluation or " \
        "checkpoint had run); set `train.checkpoint_every` to save the training state as it goes."


def write_metrics(out: Path, results: dict) -> None:
    """metrics.json, and the test split's per-example predictions (index, label, predicted) in TEST_PREDICTIONS,
    which paired comparisons of runs on the same test rows read (`mmpeft compare`)."""
    rows = results["test"].pop(PER_EXAMPLE, None) if isinstance(results.get("test"), dict) else None
    (out / METRICS).write_text(json.dumps(results, indent=2))
    if rows:
        (out / TEST_PREDICTIONS).write_text("".join(json.dumps(row) + "\n" for row in rows))
