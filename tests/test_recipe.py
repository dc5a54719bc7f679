"""The recipe, the CLI and the shipped configs, run for real as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmpeft import load_config
from mmpeft.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
FAST = ["train.progress=false", "train.tracker=null", "train.mixed_precision=no", "data.num_workers=0"]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_its_command(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    recipe = {"classification": "lora_sentiment.py", "retrieval": "lora_retrieval.py"}[cfg.task]
    assert first.startswith(f"# accelerate launch recipes/{recipe}")
    if cfg.model.name != "tiny-clip":
        assert f"--config recipes/configs/{path.name}" in first


def test_recipe_end_to_end_writes_adapter_metrics_and_serves_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "recipes" / "lora_sentiment.py"), "--config",
            str(ROOT / "recipes" / "configs" / "embedded_sentiment.yaml"), f"train.output_dir={out}",
            "train.max_steps=4", "train.eval_every=2", "train.tracker=auto", "data.num_workers=1",
            "train.mixed_precision=no"]  # fp32, so that `mmpeft eval` (fp32) must reproduce the numbers exactly
    run = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "test (600 examples)" in run.stdout and "macro avg" in run.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "mmpeft.json",
                 "metrics.json"):
        assert (out / name).is_file(), name
    assert any((out / "logs").rglob("events.out.tfevents*")), "TensorBoard events were not written"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and [h["step"] for h in metrics["history"]] == [2, 4]
    assert set(metrics["test"]) >= {"accuracy", "macro_f1", "weighted_f1", "macro_recall", "confusion_matrix",
                                    "per_class"}
    assert metrics["trainable_parameters"]["text"]["trainable"] > 0
    assert metrics["data"]["train"]["examples"] == 1200

    # The same folder through the CLI: eval writes JSON beside the adapter, predict prints probabilities.
    test_manifest = metrics["data"]["test"]["manifest"]
    assert cli_main(["eval", "--adapter", str(out), "--data", test_manifest, "--num-workers", "0"]) == 0
    evaluated = json.loads((out / "eval-test.json").read_text())
    assert evaluated["confusion_matrix"] == metrics["test"]["confusion_matrix"]
    assert evaluated["macro_f1"] == metrics["test"]["macro_f1"]
    row = json.loads(Path(test_manifest).read_text().splitlines()[0])
    image = str(Path(test_manifest).parent / row["image"])
    capsys.readouterr()
    assert cli_main(["predict", "--adapter", str(out), "--image", image, "--text", row["text"]]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["label"] in ("positive", "neutral", "negative")
    assert sum(printed["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    # A second run into the same folder must not destroy the first one's adapter.
    before = (out / "adapter_model.safetensors").read_bytes()
    again = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode != 0 and "train.overwrite=true" in again.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_cli_reports_bad_config_and_missing_files_without_traceback(tmp_path, capsys):
    assert cli_main(["train", "model.text.mode=sideways", *FAST]) == 2
    err = capsys.readouterr().err
    assert "model.text.mode" in err and "sideways" in err and "Traceback" not in err
    assert cli_main(["train", "train.epohcs=3"]) == 2
    assert "train.epohcs" in capsys.readouterr().err
    assert cli_main(["eval", "--adapter", str(tmp_path), "--data", str(tmp_path / "x.jsonl")]) == 2
    assert "mmpeft.json is missing" in capsys.readouterr().err



@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_accelerate_config_parses_and_names_its_command(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    command = "accelerate launch --config_file recipes/accelerate/" + path.name
    assert path.read_text().startswith((f"# {command}", f"# Node 0: {command}", f"# ACCELERATE_USE_CPU=1 {command}"))


def test_recipe_without_config_runs_the_embedded_yaml():
    sys.path.insert(0, str(ROOT / "recipes"))
    from lora_sentiment import DEFAULT_CONFIG, recipe_config

    assert DEFAULT_CONFIG == ROOT / "recipes" / "configs" / "embedded_sentiment.yaml"
    assert recipe_config([]) == load_config(DEFAULT_CONFIG)
    assert recipe_config([]).model.name == "tiny-clip" and recipe_config([]).data.train is None
    assert recipe_config(["train.epochs=1"]).train.epochs == 1
