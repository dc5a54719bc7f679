"""The loop's contract, tried for real on a tiny CLIP: output folders, `max_steps`, why a run stopped, evaluate-only
runs, non-finite losses inside gradient accumulation, out-of-memory anywhere in the step, and trackers."""

from __future__ import annotations

import json

import pytest
import torch

from mmpeft import load_config, train
from mmpeft.errors import ConfigError, PathExistsError, TrainingError
from mmpeft.training import tasks
from mmpeft.training.checkpoints import list_checkpoints
from mmpeft.training.run_folder import prepare_output_dir

FAST = ["train.progress=false", "train.tracker=null", "train.mixed_precision=no", "data.num_workers=0",
        "data.batch_size=4", "head.hidden=8"]


def _cfg(tiny_paths, out, data, *extra):
    return load_config(None, [f"model.name={tiny_paths['clip']}", f"train.output_dir={out}", f"data.train={data}",
                              f"data.eval={data}", *FAST, *extra])


# ------------------------------------------------------------------------------------------ output folders

def test_overwrite_removes_only_what_mmpeft_wrote(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-0000004").mkdir(parents=True)
    (out / "checkpoints" / "step-0000004" / "mmpeft_checkpoint.json").write_text("{}")
    (out / "logs" / "mmpeft").mkdir(parents=True)
    for name in ("mmpeft.json", "adapter_model.safetensors", "head.safetensors", "metrics.json", "log.txt",
                 "test_predictions.jsonl", "notes.md"):
        (out / name).write_text("x")
    with pytest.raises(PathExistsError, match="already holds a training run.*checkpoints/"):
        prepare_output_dir(out, overwrite=False, resume=False, project="mmpeft")
    _, said = prepare_output_dir(out, overwrite=True, resume=False, project="mmpeft")
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "logs", "notes.md"]  # the user's and compare's
    assert "removed the earlier run's" in said and "checkpoints/ (1 checkpoint)" in said


def test_checkpoints_alone_are_an_earlier_run(tmp_path):
    """A run interrupted before its first evaluation left checkpoints only: a new run must not mix with them."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step-0000002").mkdir(parents=True)
    (out / "checkpoints" / "step-0000002" / "mmpeft_checkpoint.json").write_text("{}")
    with pytest.raises(PathExistsError, match="resume_from=latest"):
        prepare_output_dir(out, overwrite=False, resume=False, project="mmpeft")
    assert prepare_output_dir(out, overwrite=False, resume=True, project="mmpeft")[1] is None


def test_current_folder_with_other_files_keeps_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("{}")
    (tmp_path / "metrics.json").write_text("{}")
    prepare_output_dir(".", overwrite=True, resume=False, project="mmpeft")
    assert (tmp_path / "data.jsonl").is_file() and not (tmp_path / "metrics.json").exists()


def test_overwrite_then_resume_continues_the_new_run(tiny_paths, sixteen_examples, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_paths, out, sixteen_examples, "train.max_steps=4", "train.checkpoint_every=2",
               "train.keep_checkpoints=5"))
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002", "step-0000004"]
    train(_cfg(tiny_paths, out, sixteen_examples, "train.max_steps=2", "train.checkpoint_every=1",
               "train.keep_checkpoints=5", "train.overwrite=true"))
    assert [p.name for p in list_checkpoints(out)] == ["step-0000001", "step-0000002"]  # none of the old run


# ------------------------------------------------------------------------------------------ budget and stopping

def test_max_steps_means_that_many_steps_whatever_epochs_says(tiny_paths, sixteen_examples, tmp_path):
    """16 examples / batch 4 = 4 steps per epoch; `epochs: 1` with `max_steps=6` runs 6 (as in transformers)."""
    results = train(_cfg(tiny_paths, tmp_path / "run", sixteen_examples, "train.epochs=1", "train.max_steps=6"))
    assert results["steps"] == 6 and results["stop_reason"] == "max_steps"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["stop_reason"] == "max_steps"


def test_early_stopping_says_why_and_where(tiny_paths, sixteen_examples, tmp_path, capsys):
    results = train(_cfg(tiny_paths, tmp_path / "run", sixteen_examples, "train.epochs=50", "train.eval_every=1",
                         "train.early_stopping_patience=1", "train.lr_head=1e-9", "train.lr_lora=1e-9",
                         "train.metric_for_best=accuracy"))
    assert results["stop_reason"] == "early_stopping" and results["steps"] < 200
    shown = capsys.readouterr().out
    assert f"run saved in {tmp_path / 'run'}/" in shown
    assert "early stopping: 1 evaluation(s) without improving accuracy" in shown
    assert f"mmpeft eval --adapter {tmp_path / 'run'}" in shown


def test_evaluate_only_runs_the_same_path_without_training(tiny_paths, sixteen_examples, tmp_path):
    frozen = ["model.text.mode=frozen", "model.vision.mode=frozen", "head.mode=frozen"]
    with pytest.raises(ConfigError, match="Nothing to train.*train.evaluate_only=true"):
        _cfg(tiny_paths, tmp_path / "run", sixteen_examples, *frozen)
    results = train(_cfg(tiny_paths, tmp_path / "run", sixteen_examples, *frozen, "train.evaluate_only=true"))
    assert results["steps"] == 0 and results["stop_reason"] == "evaluate_only" and "eval" in results
    assert all(p["trainable"] == 0 for p in results["trainable_parameters"].values())


# ------------------------------------------------------------------------------------------ faults

def _nan_on(calls: set[int], monkeypatch) -> list[int]:
    """Make the classification loss NaN on the given calls (0-based); returns the list of calls made."""
    seen = []
    original = tasks.ClassificationTask.loss

    def loss(self, model, batch):
        value = original(self, model, batch)
        seen.append(len(seen))
        return value * float("nan") if seen[-1] in calls else value

    monkeypatch.setattr(tasks.ClassificationTask, "loss", loss)
    return seen


def test_nonfinite_last_micro_batch_keeps_the_rest_of_the_window(tiny_paths, sixteen_examples, tmp_path,
                                                                  monkeypatch):
    """grad_accum=2: a NaN on a window's last micro-batch used to drop the whole window's gradients and its step
    (accelerate's zero_grad acts at the window's end), so 2 steps took 3 windows. Now the other micro-batch steps."""
    seen = _nan_on({1}, monkeypatch)
    results = train(_cfg(tiny_paths, tmp_path / "run", sixteen_examples, "train.grad_accum=2", "train.max_steps=2",
                         "train.skip_nonfinite=true"))
    assert results["steps"] == 2 and results["skipped_nonfinite_batches"] == 1
    assert len(seen) == 4  # 2 windows of 2 micro-batches


def test_nonfinite_loss_message_says_what_exists(tiny_paths, sixteen_examples, tmp_path, monkeypatch):
    _nan_on({0}, monkeypatch)
    with pytest.raises(TrainingError, match="at step 1.*Nothing was saved yet"):
        train(_cfg(tiny_paths, tmp_path / "run", sixteen_examples, "train.max_steps=2"))


def test_out_of_memory_in_the_optimizer_step_gets_advice(tiny_paths, sixteen_examples, tmp_path, monkeypatch):
    def step(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(TrainingError, match="Out of GPU memory with data.batch_size=4"):
        train(_cfg(tiny_paths, tmp_path / "run", sixteen_examples, "train.max_steps=2"))


def test_out_of_memory_in_evaluation_gets_advice(tiny_paths, sixteen_examples, tmp_path, monkeypatch):
    def evaluate(self, model, loader, accelerator, per_example=False):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(tasks.ClassificationTask, "evaluate", evaluate)
    with pytest.raises(TrainingError, match="evaluating the eval split.*data.eval_batch_size=2"):
        train(_cfg(tiny_paths, tmp_path / "run", sixteen_examples, "train.max_steps=1"))


def test_a_tracker_that_is_not_installed_is_refused_before_anything_runs(tiny_paths, sixteen_examples, tmp_path):
    from accelerate.utils import is_wandb_available

    if is_wandb_available():
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match="pip install wandb"):
        train(_cfg(tiny_paths, tmp_path / "run", sixteen_examples, "train.tracker=wandb"))
    assert not (tmp_path / "run").exists()


def test_a_full_disk_while_saving_the_adapter_is_one_message(tiny_paths, sixteen_examples, tmp_path, monkeypatch):
    """safetensors raises its own error on a full disk (torch.save a RuntimeError): one TrainingError naming the
    folder, not a bare SafetensorError; the staged save leaves nothing half-written."""
    from safetensors import SafetensorError

    import mmpeft.models.saving as saving

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(saving, "save_file", full_disk)
    with pytest.raises(TrainingError, match=r"Could not save the adapter of step \d+ into .*Free disk space"):
        train(_cfg(tiny_paths, tmp_path / "run", sixteen_examples, "train.max_steps=1"))
    assert not (tmp_path / "run" / "head.safetensors").exists()


@pytest.mark.slow
def test_ctrl_c_under_accelerate_launch_ends_with_the_resume_command(tiny_paths, sixteen_examples, tmp_path):
    """A terminal Ctrl-C sends SIGINT to the whole process group: accelerate's launcher prints its own
    KeyboardInterrupt traceback; the run checkpoints, waits for the launcher to go, and prints the resume command
    last."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    recipe = Path(__file__).parents[1] / "recipes" / "lora_sentiment.py"
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "run"
    cmd = [str(accelerate), "launch", "--num_processes", "1", "--mixed_precision", "no", str(recipe),
           f"model.name={tiny_paths['clip']}", f"data.train={sixteen_examples}", f"data.eval={sixteen_examples}",
           f"train.output_dir={out}", "train.max_steps=100000", "train.eval_every=100000", *FAST]
    log = tmp_path / "log.txt"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    try:
        deadline = time.monotonic() + 120
        while "trainable parameters" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # a few steps
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(15)  # the run saves its checkpoint and prints after the launcher has gone
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert "KeyboardInterrupt" in log.read_text()  # the launcher's, printed before ours
    assert "train.resume_from=latest" in lines[-1] and "lora_sentiment.py" in lines[-1], lines[-6:]
    assert any((out / "checkpoints").glob("step-*"))


def test_auto_precision_is_chosen_from_the_built_model(tiny_paths, sixteen_examples, tmp_path, monkeypatch):
    """The Accelerator is made after the model, so `auto` reads its layers: on a bf16 CPU the narrow tiny model
    trains in fp32, and the same model counted as wide enough trains in bf16."""
    from mmpeft.training import optim

    monkeypatch.setattr(optim, "cpu_supports_bf16", lambda: True)
    auto = [a for a in FAST if not a.startswith("train.mixed_precision")] + ["train.max_steps=1"]
    narrow = train(load_config(None, [f"model.name={tiny_paths['clip']}", f"train.output_dir={tmp_path / 'a'}",
                                      f"data.train={sixteen_examples}", *auto]))
    monkeypatch.setattr(optim, "CPU_BF16_MIN_WIDTH", 1)
    wide = train(load_config(None, [f"model.name={tiny_paths['clip']}", f"train.output_dir={tmp_path / 'b'}",
                                    f"data.train={sixteen_examples}", *auto]))
    assert (narrow["mixed_precision"], wide["mixed_precision"]) == ("no", "bf16")
