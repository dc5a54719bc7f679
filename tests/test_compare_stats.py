"""Paired bootstrap intervals of macro-F1 differences (mmpeft/compare/stats.py) on synthetic cases with known
answers, and the pairing of saved runs by test row."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmpeft.compare.stats import macro_f1, paired_bootstrap, paired_differences, verdict
from mmpeft.training.metrics import classification_metrics

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 3, 400)


def _noisy(accuracy: float, seed: int) -> np.ndarray:
    """Predictions right with probability `accuracy`, otherwise the next class."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(LABELS.shape) < accuracy, LABELS, (LABELS + 1) % 3)


def test_macro_f1_matches_the_training_metrics_also_batched():
    preds = _noisy(0.6, 1)
    expected = classification_metrics(LABELS, preds, ["a", "b", "c"])["macro_f1"]
    assert macro_f1(LABELS, preds, 3) == pytest.approx(expected)
    batched = macro_f1(np.stack([LABELS, LABELS]), np.stack([preds, LABELS]), 3)
    np.testing.assert_allclose(batched, [expected, 1.0])
    assert macro_f1(np.array([0, 0]), np.array([0, 0]), 3) == pytest.approx(1 / 3)  # absent classes count as 0


def test_identical_predictions_give_a_zero_interval():
    preds = _noisy(0.7, 2)
    result = paired_bootstrap(LABELS, preds, preds.copy(), 3, resamples=500)
    assert result["difference"] == result["low"] == result["high"] == 0.0
    assert verdict("a", "b", result) == "no difference shown"


def test_a_clearly_better_configuration_excludes_zero_either_way_round():
    good, bad = _noisy(0.9, 3), _noisy(0.5, 4)
    result = paired_bootstrap(LABELS, good, bad, 3, resamples=1000)
    assert 0 < result["low"] < result["difference"] < result["high"]
    assert result["difference"] == pytest.approx(macro_f1(LABELS, good, 3) - macro_f1(LABELS, bad, 3))
    assert verdict("good", "bad", result) == "good beats bad"
    assert verdict("bad", "good", paired_bootstrap(LABELS, bad, good, 3, resamples=1000)) == "good beats bad"


def test_two_coin_flips_include_zero_and_the_seed_repeats_the_interval():
    one, two = _noisy(0.5, 5), _noisy(0.5, 6)
    result = paired_bootstrap(LABELS, one, two, 3, resamples=1000, seed=7)
    assert result["low"] < 0 < result["high"] and verdict("one", "two", result) == "no difference shown"
    assert paired_bootstrap(LABELS, one, two, 3, resamples=1000, seed=7) == result


def test_seeds_that_disagree_widen_the_interval():
    """A wins clearly on one seed and loses clearly on another: across seeds no difference is shown."""
    good, bad = _noisy(0.9, 8), _noisy(0.5, 9)
    across = paired_bootstrap(LABELS, np.stack([good, bad]), np.stack([bad, good]), 3, resamples=1000)
    assert across["difference"] == pytest.approx(0.0, abs=1e-12) and across["low"] < 0 < across["high"]
    same = paired_bootstrap(LABELS, np.stack([good, good]), np.stack([bad, bad]), 3, resamples=1000)
    assert same["low"] > 0 and same["seeds"] == 2
    with pytest.raises(ValueError, match="same seeds and test rows"):
        paired_bootstrap(LABELS, np.stack([good, good]), bad, 3)


def _run(tmp_path, config, seed, preds, shots=4):
    run_dir = tmp_path / f"{config}-{shots}-{seed}"
    run_dir.mkdir()
    names = ["neg", "neu", "pos"]
    order = RNG.permutation(len(LABELS))  # written in any order: paired by index
    (run_dir / "test_predictions.jsonl").write_text("".join(
        json.dumps({"index": int(i), "label": names[LABELS[i]], "predicted": names[preds[i]]}) + "\n"
        for i in order))
    return {"config": config, "seed": seed, "shots": shots, "status": "ok", "output_dir": str(run_dir)}


def test_paired_differences_pair_saved_runs_by_row_and_seed(tmp_path):
    runs = [_run(tmp_path, "lora", s, _noisy(0.9, 10 + s)) for s in (0, 1)]
    runs += [_run(tmp_path, "probe", s, _noisy(0.5, 20 + s)) for s in (0, 1, 2)]  # seed 2 has no partner
    runs.append({"config": "broken", "seed": 0, "shots": 4, "status": "failed", "output_dir": "/nowhere"})
    (found,) = paired_differences(runs, resamples=300)
    assert (found["a"], found["b"], found["shots"], found["seeds"], found["rows"]) == ("lora", "probe", 4, 2, 400)
    expected = np.mean([macro_f1(LABELS, _noisy(0.9, 10 + s), 3) - macro_f1(LABELS, _noisy(0.5, 20 + s), 3)
                        for s in (0, 1)])
    assert found["difference"] == pytest.approx(expected) and found["verdict"] == "lora beats probe"
