"""A run folder and checkpoint written by mmpeft 0.1.0 before the refactor into packages (tests/fixtures/run-v0.1.0,
made by `mmpeft train --config recipes/configs/embedded_sentiment.yaml train.max_steps=4 train.eval_every=2
train.checkpoint_every=2 train.keep_checkpoints=1 model.text.lora.r=2 model.vision.lora.r=2 head.hidden=16
train.mixed_precision=no data.num_workers=0`) still loads, evaluates to the numbers it recorded, and resumes.

Module attribute paths are the keys of adapters, heads and checkpoints: a moved or renamed attribute would break
this test, not only a user's old runs."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from mmpeft import build_dataloaders, evaluate, load_adapter, train
from mmpeft.config import config_from_dict
from mmpeft.errors import TrainingError

FIXTURE = Path(__file__).parent / "fixtures" / "run-v0.1.0"
CHECKPOINT = FIXTURE / "checkpoints" / "step-0000004"


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    return run


def _config(run: Path, *changes):
    record = json.loads((run / "mmpeft.json").read_text())["config"]
    record["train"].update(output_dir=str(run), progress=False, tracker=None)
    for section, key, value in changes:
        record[section][key] = value
    return config_from_dict(record)


def test_old_run_loads_and_reproduces_its_test_metrics(old_run):
    model = load_adapter(old_run)
    data = build_dataloaders(model.config.data, model.source, splits=("test",), label_names=model.label_names)
    accelerator = Accelerator(cpu=True)
    metrics = evaluate(model, accelerator.prepare(data.loaders["test"]), accelerator, model.label_names)
    recorded = json.loads((old_run / "metrics.json").read_text())["test"]
    assert metrics["macro_f1"] == recorded["macro_f1"] and metrics["confusion_matrix"] == recorded["confusion_matrix"]


def test_old_checkpoint_resumes(old_run):
    """New config keys (absent from the old checkpoint's settings) at their defaults do not block the resume; the
    run was complete at step 4, so it evaluates its best step again and records the same test numbers."""
    recorded = json.loads((old_run / "metrics.json").read_text())
    results = train(_config(old_run, ("train", "resume_from", "latest")))
    assert results["steps"] == 4 and results["best_step"] == recorded["best_step"]
    assert results["test"]["macro_f1"] == recorded["test"]["macro_f1"]


def test_a_checkpoint_for_another_layout_is_refused(old_run):
    """accelerate's `load_state(strict=False)` drops keys that do not match: a renamed module must be refused
    instead of resuming nothing."""
    checkpoint = old_run / "checkpoints" / CHECKPOINT.name
    weights = load_file(checkpoint / "model.safetensors")
    name = next(k for k in weights if k.startswith("head."))
    weights[name.replace("head.", "fusion_head.", 1)] = weights.pop(name)
    save_file(weights, checkpoint / "model.safetensors")
    index = json.loads((checkpoint / "mmpeft_checkpoint.json").read_text())
    index["files"]["model.safetensors"] = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    (checkpoint / "mmpeft_checkpoint.json").write_text(json.dumps(index))
    with pytest.raises(TrainingError, match="does not fit this model.*fusion_head"):
        train(_config(old_run, ("train", "resume_from", "latest")))
