"""Paired differences in test macro-F1 between two configurations, with bootstrap 95 % intervals.

Two runs are paired by test row (the same manifest index; every configuration of a comparison sees the same test
split). One resample draws test rows with replacement and, across seeds, the seeds with replacement too (the
configurations' runs of one seed stay paired: they trained on the same subset); its statistic is the mean over the
drawn seeds of macro-F1(A) - macro-F1(B) on the drawn rows. The interval is the 2.5th to 97.5th percentile of
that statistic over `RESAMPLES` seeded resamples (a two-level, percentile bootstrap): with one seed it is the
plain paired bootstrap over test rows; with several, the seed-to-seed spread widens it as it should.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro-F1 over the last axis: `labels` and `preds` (..., N) of class ids; a class absent from both labels
    and predictions counts as F1 0, as in `training.metrics.classification_metrics`."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    classes = np.arange(num_classes)[:, None]  # (C, 1) against (..., 1, N)
    hit_label = labels[..., None, :] == classes
    hit_pred = preds[..., None, :] == classes
    true_pos = (hit_label & hit_pred).sum(-1)
    denominator = hit_label.sum(-1) + hit_pred.sum(-1)  # 2TP + FP + FN
    f1 = np.divide(2 * true_pos, denominator, out=np.zeros(denominator.shape), where=denominator > 0)
    return f1.mean(-1)


def paired_bootstrap(labels: np.ndarray, preds_a: np.ndarray, preds_b: np.ndarray, num_classes: int, *,
                     resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The difference in macro-F1 of A over B and its bootstrap interval. `labels` is (N,) or (S, N) and
    `preds_*` (S, N) or (N,): S seeds of the same N test rows, row i of every seed the same example."""
    preds_a, preds_b = np.atleast_2d(preds_a), np.atleast_2d(preds_b)
    labels = np.broadcast_to(labels, preds_a.shape)
    if preds_a.shape != preds_b.shape:
        raise ValueError(f"paired predictions need the same seeds and test rows, got {preds_a.shape} and "
                         f"{preds_b.shape}.")
    seeds, rows = preds_a.shape
    per_seed = macro_f1(labels, preds_a, num_classes) - macro_f1(labels, preds_b, num_classes)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    chunk = max(1, 2**22 // max(1, seeds * rows * num_classes))  # bounds the (chunk, S, C, N) boolean arrays
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        drawn_seeds = rng.integers(0, seeds, size=(n, seeds)) if seeds > 1 else np.zeros((n, 1), dtype=int)
        drawn_rows = rng.integers(0, rows, size=(n, 1, rows))
        pick = (drawn_seeds[..., None], drawn_rows)
        diff = (macro_f1(labels[pick], preds_a[pick], num_classes)
                - macro_f1(labels[pick], preds_b[pick], num_classes))
        diffs[start:start + n] = diff.mean(-1)
    low, high = np.quantile(diffs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"difference": float(per_seed.mean()), "low": float(low), "high": float(high),
            "per_seed": per_seed.tolist(), "seeds": seeds, "rows": rows, "resamples": resamples}


def verdict(a: str, b: str, interval: dict) -> str:
    """'A beats B' only where the interval excludes 0."""
    if interval["low"] > 0:
        return f"{a} beats {b}"
    if interval["high"] < 0:
        return f"{b} beats {a}"
    return "no difference shown"


def read_predictions(run_dir: str | Path) -> dict[int, tuple[str, str]] | None:
    """{test row index: (label, predicted)} from a run's test_predictions.jsonl; None when it has none."""
    from ..training.run_folder import TEST_PREDICTIONS

    path = Path(run_dir) / TEST_PREDICTIONS
    if not path.is_file():
        return None
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {row["index"]: (row["label"], row["predicted"]) for row in rows}


def _stacked(runs_a: list[dict], runs_b: list[dict]) -> tuple | None:
    """Labels (S, N), predictions of A and B (S, N) as class ids over the seeds both finished; None if unpaired."""
    by_seed_b = {r["seed"]: r for r in runs_b}
    pairs = [(read_predictions(a["output_dir"]), read_predictions(by_seed_b[a["seed"]]["output_dir"]))
             for a in runs_a if a["seed"] in by_seed_b]
    pairs = [(p, q) for p, q in pairs if p and q and p.keys() == q.keys()]
    if not pairs:
        return None
    names = sorted({v for p, q in pairs for table in (p, q) for row in table.values() for v in row})
    ids = {name: i for i, name in enumerate(names)}
    index = sorted(pairs[0][0])
    if any(sorted(p) != index for p, _ in pairs):
        return None
    labels = np.array([[ids[p[i][0]] for i in index] for p, _ in pairs])
    preds_a = np.array([[ids[p[i][1]] for i in index] for p, _ in pairs])
    preds_b = np.array([[ids[q[i][1]] for i in index] for _, q in pairs])
    return labels, preds_a, preds_b, len(names)


def paired_differences(runs: list[dict], *, resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """Every pair of configurations at every training size, from the finished runs' per-example predictions."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for run in runs:
        if run["status"] == "ok":
            groups.setdefault(run["shots"], {}).setdefault(run["config"], []).append(run)
    found = []
    for shots, by_config in groups.items():
        names = list(by_config)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                stacked = _stacked(by_config[a], by_config[b])
                if stacked is None:
                    continue
                labels, preds_a, preds_b, num_classes = stacked
                interval = paired_bootstrap(labels, preds_a, preds_b, num_classes, resamples=resamples, seed=seed)
                found.append({"shots": shots, "a": a, "b": b, **interval, "verdict": verdict(a, b, interval)})
    return found
