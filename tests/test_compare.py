"""The comparison: fresh-process runs with their own peak memory, results.json / results.md / PNG charts, and
failed configurations reported beside the others."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from mmpeft.compare.child import run_child
from mmpeft.compare.curves import LEARNING_CURVE
from mmpeft.compare.report import MEASURES, markdown, write_report
from mmpeft.compare.runner import CONFIGS, TASK_OVERRIDES, compare, plan_configs, prepare_data, subsample_manifest
from mmpeft.config import load_config

ROOT = Path(__file__).resolve().parent.parent
BASE = str(ROOT / "recipes" / "configs" / "embedded_sentiment.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, path


@pytest.fixture
def one_thread_children(monkeypatch):
    """Children inherit this: on a busy 2-core box OpenMP spinning in tiny models costs more than it gains."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize("task", list(CONFIGS))
def test_every_named_configuration_is_a_valid_config(task, tmp_path):
    data = [f"data.train={tmp_path / 'train.jsonl'}"]
    for name, overrides in CONFIGS[task].items():
        cfg = load_config(BASE, [*TASK_OVERRIDES[task], *overrides, *data])
        assert cfg.train.tracker is None, name
    assert load_config(BASE, [*TASK_OVERRIDES["fewshot"], *CONFIGS["fewshot"]["zero_shot"]]).head.type == "prompt"


def test_unknown_configuration_names_the_known_ones():
    with pytest.raises(ValueError, match="lora_both"):
        plan_configs("sentiment", ["lora_both", "lora_everything"])
    assert list(plan_configs("fewshot", ["mine", "zero_shot"], {"mine": ["head.hidden=0"]})) == ["mine", "zero_shot"]


def test_run_child_measures_each_process_alone(tmp_path):
    """A small process after a big one reports its own peak (RUSAGE_CHILDREN would report the big one's)."""
    big = run_child([sys.executable, "-c", "b = b'x' * (300 * 2**20)"], tmp_path / "big.log")
    small = run_child([sys.executable, "-c", "print('hello')"], tmp_path / "small.log")
    failing = run_child([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "fail.log")
    assert big["exit_code"] == small["exit_code"] == 0 and failing["exit_code"] == 3
    assert big["peak_rss_gib"] > 0.28
    assert 0 < small["peak_rss_gib"] < 0.1
    assert (tmp_path / "small.log").read_text() == "hello\n"
    slow = run_child([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "slow.log", timeout=1)
    assert slow["timed_out"] and slow["exit_code"] != 0 and slow["wall_seconds"] < 30


def test_subsample_manifest_draws_k_per_label_by_seed(tmp_path):
    src = tmp_path / "data" / "train.jsonl"
    src.parent.mkdir()
    rows = [{"image": f"img_{i}.jpg", "text": f"t{i}", "label": "a" if i < 5 else "b"} for i in range(8)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    picks = []
    for seed in range(4):
        path = subsample_manifest(src, tmp_path / f"k2-seed{seed}", shots=2, seed=seed)
        chosen = [json.loads(line) for line in path.read_text().splitlines()]
        assert sorted(r["label"] for r in chosen) == ["a", "a", "b", "b"]
        assert all(Path(r["image"]).is_absolute() and Path(r["image"]).parent == src.parent for r in chosen)
        picks.append(tuple(r["text"] for r in chosen))
    again = subsample_manifest(src, tmp_path / "again", shots=2, seed=0).read_text().splitlines()
    assert tuple(json.loads(line)["text"] for line in again) == picks[0]
    assert len(set(picks)) > 1
    with pytest.raises(ValueError, match="'b': 3"):
        subsample_manifest(src, tmp_path / "k4", shots=4, seed=0)


def _record(config, shots, seed, f1, status="ok"):
    record = {"config": config, "shots": shots, "seed": seed, "status": status, "output_dir": f"/x/{config}",
              "error": None if status == "ok" else "Traceback...\nValueError: broken on purpose"}
    if status == "ok":
        record.update(test_macro_f1=f1, test_accuracy=f1, train_seconds=2.0 + seed, peak_memory_gib=1.0,
                      trainable_parameters=0 if config == "zero_shot" else 1000, adapter_bytes=0 if
                      config == "zero_shot" else 4096)
    return record


def test_report_means_stds_failures_and_charts(tmp_path):
    runs = [_record(c, k, s, f1=0.5 + 0.1 * s + 0.01 * k) for c in ("zero_shot", "lora_both") for k in (1, 4)
            for s in (0, 1)]
    runs.append(_record("lora_both", 4, 2, None, status="failed"))
    results = {"meta": {"task": "fewshot", "attribute": "shape", "base": None, "extra_overrides": [],
                        "task_overrides": ["head.type=prompt"], "quick": False, "quick_overrides": [],
                        "seeds": [0, 1, 2], "device": "cpu", "memory": "peak RSS", "torch": "x",
                        "started": "now", "configs": {"zero_shot": ["head.mode=frozen"], "lora_both": []}},
               "runs": runs}
    text = markdown(results)
    assert "| zero_shot | 1 | 2 | 0.560 ± 0.071 |" in text  # mean and sample std of 0.51, 0.61
    assert "| lora_both | 4 | 2 (1 failed) | 0.590 ± 0.071 |" in text
    assert "| lora_both | 0.560 ± 0.071 | 0.590 ± 0.071 |" in text  # the F1-by-size table
    assert "feature cache (`train.feature_cache`): off for every run" in text
    assert "ValueError: broken on purpose" in text and "Failed runs" in text
    written = write_report(results, tmp_path)
    assert {p.name for p in written} == {"results.json", "results.md", LEARNING_CURVE, *(m[2] for m in MEASURES)}
    for path in written:
        if path.suffix == ".png":
            _assert_png(path)


def test_quick_sentiment_comparison(tmp_path, tiny_paths, one_thread_children):
    configs = {**plan_configs("sentiment", ["linear_probe", "lora_both"]),
               "broken": ["model.text.mode=bogus"],  # rejected before a process starts
               "crash": ["data.label_column=no_such_column"]}  # fails inside its process
    out = tmp_path / "compare"
    results = compare("sentiment", out, configs=configs, seeds=[0], base=BASE, quick=True,
                      extra=[f"model.name={tiny_paths['clip']}", "train.mixed_precision=no"], log=lambda _: None)

    saved = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in saved["runs"]] == list(configs)
    status = {r["config"]: r for r in saved["runs"]}
    assert [r["status"] for r in saved["runs"]] == ["ok", "ok", "failed", "failed"]
    assert "bogus" in status["broken"]["error"] and "exit_code" not in status["broken"]
    assert "no_such_column" in status["crash"]["error"] and status["crash"]["exit_code"] == 2

    parent_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for name in ("linear_probe", "lora_both"):
        run = status[name]
        assert 0 <= run["test_macro_f1"] <= 1 and run["steps"] == 4
        assert run["peak_memory_gib"] > 0.05 and run["peak_memory_gib"] != pytest.approx(parent_gib, abs=1e-6)
        run_dir = Path(run["output_dir"])
        assert run["adapter_bytes"] == sum((run_dir / f).stat().st_size for f in
                                           ("adapter_model.safetensors", "head.safetensors") if (run_dir / f).exists())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert run["trainable_parameters"] == sum(p["trainable"] for p in metrics["trainable_parameters"].values())
    probe, lora = status["linear_probe"], status["lora_both"]
    assert probe["trainable_by_part"]["text"] == probe["trainable_by_part"]["vision"] == 0
    assert lora["trainable_parameters"] > probe["trainable_parameters"]
    assert lora["adapter_bytes"] > probe["adapter_bytes"]

    table = (out / "results.md").read_text()
    for name in configs:
        assert f"| {name} |" in table
    assert "| broken | 0 (1 failed) |" in table
    for _, _, chart in MEASURES:
        _assert_png(out / chart)
    assert {Path(p).name for p in results["written"]} >= {"results.json", "results.md"}


def test_short_learning_curve_writes_table_curves_and_intervals(tmp_path, tiny_paths, one_thread_children):
    """The CI-sized learning curve: two sizes (4 per class and the whole split) x two seeds, 4 steps a run."""
    out = tmp_path / "curves"
    results = compare("sentiment", out, configs=plan_configs("sentiment", ["linear_probe", "lora_text"]),
                      shots=[4, None], seeds=[0, 1], base=BASE, quick=True, log=lambda _: None,
                      extra=[f"model.name={tiny_paths['clip']}", "train.mixed_precision=no"])
    assert [r["status"] for r in results["runs"]] == ["ok"] * 8, [r.get("error") for r in results["runs"]]
    by_key = {(r["config"], r["shots"], r["seed"]): r for r in results["runs"]}
    assert all(r["steps"] == 4 and r["test_predictions"] for r in results["runs"])  # quick overrides the budget
    assert by_key["linear_probe", 4, 0]["train_examples"] == 12 and by_key["lora_text", 4, 0]["train_examples"] == 12
    assert by_key["linear_probe", None, 0]["train_examples"] == 96
    for seed in (0, 1):  # the same subset for every configuration of a seed
        assert "data.train=" + str(out / "data" / f"sentiment-k4-seed{seed}" / "train.jsonl") in \
            by_key["lora_text", 4, seed]["overrides"]
    assert "train.max_steps=200" in by_key["lora_text", None, 0]["overrides"]  # the one budget rule, then quick
    assert results["meta"]["step_budget"].startswith("4 optimizer steps for every configuration and size")
    predictions = (Path(by_key["lora_text", 4, 1]["output_dir"]) / "test_predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in predictions] == list(range(96))

    paired = results["paired"]
    assert [(p["shots"], p["a"], p["b"], p["seeds"], p["rows"]) for p in paired] == \
        [(4, "linear_probe", "lora_text", 2, 96), (None, "linear_probe", "lora_text", 2, 96)]
    for p in paired:
        assert p["low"] <= p["difference"] <= p["high"]
        assert p["difference"] == pytest.approx(sum(p["per_seed"]) / 2)
        assert (p["verdict"] == "no difference shown") == (p["low"] <= 0 <= p["high"])
    table = (out / "results.md").read_text()
    assert "## Paired differences in test macro-F1" in table and "(2 seeds, 96 rows) → " in table
    assert "| config | k=4 | all |" in table and "step budget: 4 optimizer steps" in table
    # every run shares frozen towers' features through the on-disk cache under out/feature-cache
    assert ("feature cache (`train.feature_cache`): on (text, vision): linear_probe; on (vision): lora_text"
            in table)
    assert any((out / "feature-cache" / "features").glob("*/complete.json"))
    _assert_png(out / LEARNING_CURVE)
    assert json.loads((out / "results.json").read_text())["paired"] == paired


def test_train_sizes_and_shots_are_one_flag():
    import argparse

    from mmpeft.compare.runner import add_compare_arguments

    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    assert parser.parse_args(["--train-sizes", "8,16,161,all"]).shots == [8, 16, 161, None]
    assert parser.parse_args(["--shots", "1,2"]).shots == [1, 2]
    with pytest.raises(SystemExit):
        parser.parse_args(["--train-sizes", "8,most"])
    with pytest.raises(ValueError, match="fewshot needs k-shot sizes"):
        compare("fewshot", "/nonexistent/never-written", shots=[1, None])


def test_quick_fewshot_zero_shot_is_evaluated_untrained(tmp_path, tiny_paths, one_thread_children):
    out = tmp_path / "fewshot"
    results = compare("fewshot", out, configs=plan_configs("fewshot", ["zero_shot", "linear_probe"]), shots=[1],
                      seeds=[0], base=BASE, quick=True, log=lambda _: None,
                      extra=[f"model.name={tiny_paths['clip']}", "train.mixed_precision=no"])
    zero, probe = results["runs"]
    assert zero["status"] == probe["status"] == "ok", (zero.get("error"), probe.get("error"))
    assert not zero["trained"] and zero["command"][1:4] == ["-m", "mmpeft.cli", "train"]
    assert "train.evaluate_only=true" in zero["command"]  # the same loop, fit skipped
    assert zero["trainable_parameters"] == zero["adapter_bytes"] == zero["steps"] == 0
    assert probe["trained"] and probe["trainable_parameters"] > 0 and probe["steps"] == 4
    manifest = Path(out / "data" / "shape-k1-seed0" / "train.jsonl").read_text().splitlines()
    assert len(manifest) == len({json.loads(line)["label"] for line in manifest})  # one shot per class
    assert zero["peak_memory_gib"] > 0 and "| zero_shot | 1 | 1 |" in (out / "results.md").read_text()


def test_compare_help(capsys):
    from mmpeft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "--task" in shown and "--shots" in shown and "lora_both_reg" in shown
    recipe = subprocess.run([sys.executable, str(ROOT / "recipes" / "compare.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert recipe.returncode == 0 and "embedded_sentiment.yaml" in recipe.stdout


def test_merge_compare_keeps_configurations_added_with_define(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import merge_compare
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def source(name, configs, runs, started):
        meta = {"task": "sentiment", "base": None, "extra_overrides": [], "task_overrides": [], "quick": True,
                "attribute": None, "configs": configs, "seeds": sorted({r["seed"] for r in runs}),
                "git_commit": "abc", "started": started, "finished": started}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"meta": meta, "runs": runs}))
        return tmp_path / name

    shipped = {"lora_both": CONFIGS["sentiment"]["lora_both"]}
    one = source("one", {**shipped, "r4": ["model.text.lora.r=4"]},
                 [_record("r4", None, 0, 0.7), _record("lora_both", None, 0, 0.9)], "t1")
    two = source("two", {"r4": ["model.text.lora.r=4"]}, [_record("r4", None, 1, 0.8)], "t2")
    merged = merge_compare.merge([one, two])
    assert [(r["config"], r["seed"]) for r in merged["runs"]] == [("lora_both", 0), ("r4", 0), ("r4", 1)]
    assert merged["meta"]["configs"] == {"lora_both": shipped["lora_both"], "r4": ["model.text.lora.r=4"]}
    clash = source("three", {"r4": ["model.text.lora.r=8"]}, [_record("r4", None, 2, 0.8)], "t3")
    with pytest.raises(SystemExit, match=r"defines configuration 'r4' as \['model.text.lora.r=8'\]"):
        merge_compare.merge([one, clash])


def test_position_task_writes_its_own_data_and_subsamples_it_per_shots(tmp_path):
    data = prepare_data("position", tmp_path, None, [], [None, 2], [0], quick=True)
    full = dict(o.split("=", 1) for o in data[None, 0])
    assert Path(full["data.train"]).parent == tmp_path / "data" / "position-quick"
    assert len(Path(full["data.train"]).read_text().splitlines()) == 3 * 16
    shots = dict(o.split("=", 1) for o in data[2, 0] if "=" in o)
    rows = [json.loads(line) for line in Path(shots["data.train"]).read_text().splitlines()]
    assert sorted(r["label"] for r in rows) == ["center", "center", "left", "left", "right", "right"]
    assert shots["data.test"] == full["data.test"] and shots["data.allow_outside_root"] == "true"
