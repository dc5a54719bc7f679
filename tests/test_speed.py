"""The speed harness (benchmarks/speed.py through `mmpeft bench`): a 2-step smoke run on the tiny default and the
schema of the JSON it writes. Never timed: the numbers are data, only their shape is tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SIDE_KEYS = {"samples_per_s", "step_seconds", "peak_memory_gib", "trainable_parameters"}
SPREAD_KEYS = {"median", "min", "max", "spread", "values"}
RUN_KEYS = {"command", "git_commit", "uncommitted_changes", "date", "versions", "hardware", "peak_memory"}


def _bench(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "results"
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nkept\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MMPEFT_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "mmpeft.cli", "bench", "--shapes", "tiny", "--modes", "lora",
                           "--pairs", "1", "--warmup", "1", "--out", str(out), "--readme", str(readme), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and "<!-- speed:start -->" in text
    for r in results:
        c = r["config"]
        assert f"| {c['device']} | {c['kind']} | tiny | lora |" in text
    return results


def _check_schema(result: dict, kind: str, steps: int) -> None:
    assert result["schema"] == "mmpeft-speed/1"
    assert RUN_KEYS <= set(result["run"]) and result["run"]["versions"]["torch"]
    assert {"cpu", "cores", "memory_gib", "gpu"} <= set(result["run"]["hardware"])
    assert result["config"]["kind"] == kind and result["config"]["warmup"] == 1 and result["config"]["pairs"] == 1
    assert len(result["load_avg"]) == 3 and all(v >= 0 for v in result["load_avg"])
    for side in ("mmpeft", "plain"):
        s = result["sides"][side]
        assert SIDE_KEYS <= set(s)
        assert SPREAD_KEYS <= set(s["samples_per_s"]) and s["samples_per_s"]["median"] > 0
        assert {"median", "p10", "p90", "min", "max", "n"} <= set(s["step_seconds"])
        assert s["step_seconds"]["n"] == steps - 1  # the warm-up step is left out
        assert s["peak_memory_gib"]["median"] > 0.1
        assert len(result["runs"][0][side]["step_seconds"]) == steps
    # Same LoRA (r=16, q/k/v/out, both towers) and the same linear head on both sides.
    assert result["sides"]["mmpeft"]["trainable_parameters"] == result["sides"]["plain"]["trainable_parameters"]
    ratio = result["ratios"]["samples_per_s"]
    assert ratio["values"] and ratio["median"] > 0
    assert result["precision_used"] == {"mmpeft": "no", "plain": "no"}


@pytest.mark.slow  # three fresh processes importing torch + transformers: ~40-60 s on 2 shared cores
def test_step_smoke_run_writes_the_schema(tmp_path):
    (result,) = _bench(tmp_path, "--kinds", "step", "--steps", "2")
    _check_schema(result, "step", 2)
    assert result["config"]["text_tokens_plain"] == result["runs"][0]["mmpeft"]["text_tokens"]


@pytest.mark.slow
def test_end_to_end_smoke_run_reads_mmpeft_train(tmp_path):
    (result,) = _bench(tmp_path, "--kinds", "e2e", "--batch", "4", "--e2e-examples", "12")
    _check_schema(result, "e2e", 3)  # one epoch of 12 JPEG files
    assert "wall_speedup" in result["ratios"]
    assert result["runs"][0]["mmpeft"]["timing_source"] != "mean over all steps (warm-up NOT skipped)"


def test_bench_outside_a_source_checkout_says_why(monkeypatch, tmp_path, capsys):
    from mmpeft import cli
    from mmpeft.cli import tools

    monkeypatch.setattr(tools, "SPEED_HARNESS", tmp_path / "benchmarks" / "speed.py")
    assert cli.main(["bench", "--shapes", "tiny"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_statistics_skip_the_warm_up_and_pair_the_runs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed_report

    a = [{"step_seconds": [9.0, 1.0, 1.0], "batch": 8, "peak_memory_gib": 1.0, "trainable_parameters": 5},
         {"step_seconds": [9.0, 2.0, 2.0], "batch": 8, "peak_memory_gib": 1.2, "trainable_parameters": 5}]
    b = [{"step_seconds": [1.0, 2.0, 2.0], "batch": 8, "peak_memory_gib": 2.0, "trainable_parameters": 5},
         {"step_seconds": [1.0, 2.0, 2.0], "batch": 8, "peak_memory_gib": 2.0, "trainable_parameters": 5}]
    side = speed_report.summarize_side(a, warmup=1)
    assert side["samples_per_s"]["values"] == [8.0, 4.0] and side["step_seconds"]["n"] == 4
    ratios = speed_report.ratios(list(zip(a, b)), warmup=1)
    assert ratios["samples_per_s"]["values"] == [2.0, 1.0] and ratios["samples_per_s"]["median"] == 1.5
    assert ratios["peak_memory"]["values"] == [0.5, 0.6]


@pytest.mark.slow  # two `mmpeft train` processes on the embedded task, 2 steps each
def test_precision_f1_smoke_run_writes_both_precisions(tmp_path):
    """benchmarks/precision_f1.py: fp32 and bf16 runs of one seed, their test macro-F1 and the gap, JSON + table."""
    readme, out = tmp_path / "README.md", tmp_path / "precision_f1.json"
    readme.write_text("# Benchmarks\n")
    command = [sys.executable, str(ROOT / "benchmarks" / "precision_f1.py"), "--seeds", "0", "--steps", "2",
               "--out", str(out), "--readme", str(readme)]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["precision"], r["seed"], r["steps"]) for r in result["rows"]] == [("no", 0, 2), ("bf16", 0, 2)]
    assert [r["mixed_precision"] for r in result["rows"]] == ["no", "bf16"]
    assert result["rows"][1]["choices"]["weights"].startswith("bfloat16")
    gap = 100 * (result["rows"][1]["test_macro_f1"] - result["rows"][0]["test_macro_f1"])
    assert result["gaps_points"] == [pytest.approx(gap)] and result["largest_gap_points"] == pytest.approx(abs(gap))
    assert "<!-- precision-f1:start -->" in readme.read_text() and "| 0 |" in readme.read_text()


def test_plain_loop_last_layers_targets_match_mmpeft_lora_layers(tiny_paths):
    """lora_last2's plain side adapts the last N layers' q/k/v/out of each tower (towers of different depths
    included), the modules mmpeft's `model.<tower>.lora.layers=N` adapts (checked at N=1 on the 2-layer tiny CLIP)."""
    import re
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import plain_loop

    from mmpeft import build_classifier, load_backbone, load_config
    from mmpeft.models.adapters import lora_module_names

    config = SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=3),
                             vision_config=SimpleNamespace(num_hidden_layers=4))
    pattern = re.compile(plain_loop.last_layers_targets(config))
    names = [f"{t}.encoder.layers.{i}.self_attn.{p}_proj" for t, n in (("text_model", 3), ("vision_model", 4))
             for i in range(n) for p in ("q", "k", "v", "out")]
    assert [n for n in names if pattern.fullmatch(n)] == [
        f"{t}.encoder.layers.{i}.self_attn.{p}_proj" for t, layers in (("text_model", (1, 2)), ("vision_model", (2, 3)))
        for i in layers for p in ("q", "k", "v", "out")]
    cfg = load_config(None, [f"model.name={tiny_paths['clip']}", "model.text.lora.layers=1",
                             "model.vision.lora.layers=1"])
    backbone = load_backbone(cfg.model.name)
    tiny = re.compile(plain_loop.last_layers_targets(backbone.model.config, n=1))
    adapted = set(lora_module_names(build_classifier(backbone, cfg, ["a", "b"]).base))
    assert adapted == {n for n, _ in backbone.model.named_modules() if tiny.fullmatch(n)}
