"""Checkpoints and faults: kill and resume exactly, tampered or failed checkpoints, NaN, OOM, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_manifest
from safetensors.torch import load_file

from mmpeft import load_config
from mmpeft.data.augment import ImageAugment
from mmpeft.training.checkpoints import CheckpointError, list_checkpoints, verify_checkpoint
from mmpeft.training.faults import TrainingError
from mmpeft.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false", "train.tracker=null", "train.mixed_precision=no"]


@pytest.fixture(scope="module")
def data48(tmp_path_factory) -> dict[str, Path]:
    """48 training and 12 eval examples over 3 labels: 6 batches of 8 per epoch, so step 4 is mid-epoch."""
    folder = tmp_path_factory.mktemp("data48")
    def rows(n, offset):
        return [{"text": f"{['good', 'fine', 'bad'][i % 3]} thing {i}", "label": ["pos", "neu", "neg"][i % 3],
                 "color": ((i * 40 + offset) % 256, 90 * (i % 3), 60)} for i in range(n)]
    return {"train": write_manifest(folder, rows(48, 0), "train.jsonl"),
            "eval": write_manifest(folder, rows(12, 7), "eval.jsonl")}


def _overrides(tiny_paths, data48, out: Path, *extra: str) -> list[str]:
    """Shuffling, augmentation, dropout everywhere and a DataLoader worker: every source of randomness on."""
    return [f"model.name={tiny_paths['clip']}", f"data.train={data48['train']}", f"data.eval={data48['eval']}",
            "data.batch_size=8", "data.num_workers=1", "data.augment.enabled=true", "model.text.lora.dropout=0.1",
            "model.vision.lora.dropout=0.1", "head.dropout=0.2", "train.epochs=3", "train.checkpoint_every=2",
            "train.keep_checkpoints=3", f"train.output_dir={out}", *QUIET, *extra]


def _recipe(args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / "lora_sentiment.py"), *args]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def test_augmentation_is_keyed_by_seed_epoch_and_example():
    from PIL import Image

    image = Image.linear_gradient("L").convert("RGB").resize((32, 32))
    augment = ImageAugment(seed=3)
    same = [augment(image, epoch=1, index=5).tobytes() for _ in range(2)]
    assert same[0] == same[1]
    assert augment(image, epoch=2, index=5).tobytes() != same[0]
    assert augment(image, epoch=1, index=6).tobytes() != same[0]
    state = torch.random.get_rng_state()
    augment(image, epoch=0, index=0)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG stream is untouched
    with pytest.raises(ValueError, match="crop_scale"):
        ImageAugment(crop_scale=(0.0, 1.0))


def test_killed_mid_epoch_and_resumed_equals_an_uninterrupted_run(tmp_path, tiny_paths, data48):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full"
    done = subprocess.run(_recipe(_overrides(tiny_paths, data48, full)), capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_recipe(_overrides(tiny_paths, data48, cut)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while not list_checkpoints(cut) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    latest = list_checkpoints(cut)[-1]
    reached = verify_checkpoint(latest)
    assert reached.step < 18, "killed too late to test a resume"

    resumed = subprocess.run(_recipe(_overrides(tiny_paths, data48, cut, "train.resume_from=latest")),
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {latest}: step {reached.step}" in resumed.stdout

    for name in ("adapter_model.safetensors", "head.safetensors"):
        a, b = _tensors(full / name), _tensors(cut / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    metrics_full = json.loads((full / "metrics.json").read_text())
    metrics_cut = json.loads((cut / "metrics.json").read_text())
    for key in ("eval", "history", "best_step", "steps"):
        assert metrics_cut[key] == metrics_full[key], key


def test_a_checkpoint_changed_after_writing_is_refused(tmp_path, tiny_paths, data48):
    out = tmp_path / "run"
    train(load_config(None, _overrides(tiny_paths, data48, out, "data.num_workers=0", "train.epochs=1")))
    latest = list_checkpoints(out)[-1]
    optimizer_file = next(latest.glob("optimizer*.bin"))
    optimizer_file.write_bytes(optimizer_file.read_bytes() + b"\0")
    (latest / "extra.pkl").write_bytes(b"not ours")
    cfg = load_config(None, _overrides(tiny_paths, data48, out, "data.num_workers=0", "train.resume_from=latest"))
    with pytest.raises(CheckpointError, match=r"optimizer.*changed after mmpeft wrote it.*extra\.pkl was not written"):
        train(cfg)


def test_resuming_under_other_settings_is_refused(tmp_path, tiny_paths, data48):
    out = tmp_path / "run"
    train(load_config(None, _overrides(tiny_paths, data48, out, "data.num_workers=0", "train.epochs=1")))
    cfg = load_config(None, _overrides(tiny_paths, data48, out, "data.num_workers=0", "train.epochs=1",
                                       "data.batch_size=4", "train.resume_from=latest", "train.progress=true"))
    with pytest.raises(CheckpointError, match=r"other settings: data\.batch_size \(checkpoint 8, now 4\)\.") as err:
        train(cfg)
    assert "train.progress" not in str(err.value)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, tiny_paths, data48, monkeypatch):
    from accelerate import Accelerator

    out = tmp_path / "run"
    real_save, calls = Accelerator.save_state, []

    def flaky_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            Path(output_dir, "partial.bin").write_bytes(b"half")
            raise OSError(28, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", flaky_save)
    with pytest.raises(TrainingError, match=r"step 4.*No space left.*Earlier checkpoints are intact"):
        train(load_config(None, _overrides(tiny_paths, data48, out, "data.num_workers=0")))
    kept = list_checkpoints(out)
    assert [p.name for p in kept] == ["step-0000002"]
    assert verify_checkpoint(kept[0]).step == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped_and_counted(tmp_path, tiny_paths, data48):
    # A huge head learning rate turns the head's weights into inf after the first step.
    blow_up = ["train.lr_head=1e30", "train.max_grad_norm=null", "train.warmup_ratio=0", "train.epochs=1",
               "data.num_workers=0", "data.augment.enabled=false"]
    # Checked on the device (fused AdamW skips the update itself), read at the log points: step 6 is the last.
    with pytest.raises(TrainingError, match=r"not finite at step 2 \(seen at step 6"):
        train(load_config(None, _overrides(tiny_paths, data48, tmp_path / "stop", *blow_up)))
    results = train(load_config(None, _overrides(tiny_paths, data48, tmp_path / "skip", *blow_up,
                                                 "train.skip_nonfinite=true")))
    assert results["skipped_nonfinite_batches"] == 5 and results["steps"] == 6  # skipped steps count, as GradScaler's
    # With accumulation the loss is checked on the host, micro-batch by micro-batch: the run stops at once, and a
    # skipped window makes no optimizer step.
    accumulate = [*blow_up, "train.grad_accum=2"]
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step 2 \(epoch 0, batch 3\)"):
        train(load_config(None, _overrides(tiny_paths, data48, tmp_path / "stop2", *accumulate)))
    results = train(load_config(None, _overrides(tiny_paths, data48, tmp_path / "skip2", *accumulate,
                                                 "train.skip_nonfinite=true")))
    assert results["skipped_nonfinite_batches"] == 4 and results["steps"] == 1


def test_out_of_memory_ends_with_advice(tmp_path, tiny_paths, data48, monkeypatch):
    from mmpeft.models.classifier import FusionClassifier

    def oom(self, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FusionClassifier, "forward", oom)
    with pytest.raises(TrainingError, match=r"data\.batch_size=4 train\.grad_accum=2.*gradient_checkpointing"):
        train(load_config(None, _overrides(tiny_paths, data48, tmp_path / "oom", "data.num_workers=0")))


def test_ctrl_c_saves_a_checkpoint_then_resume_finishes(tmp_path, tiny_paths, data48):
    out = tmp_path / "run"
    args = _overrides(tiny_paths, data48, out, "train.checkpoint_every=100", "data.num_workers=0")
    proc = subprocess.Popen(_recipe(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not (out / "metrics.json").exists() and not (out / "head.safetensors").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)  # the first evaluation has saved an adapter: training is under way
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr[-3000:]
    assert "Interrupted at step" in stderr and "train.resume_from=latest" in stderr and "Traceback" not in stderr
    assert len(list_checkpoints(out)) == 1
    resumed = subprocess.run(_recipe([*args, "train.resume_from=latest"]), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 18
