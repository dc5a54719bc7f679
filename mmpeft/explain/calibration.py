"""Calibration and errors: confusion matrix and per-class P/R/F1 (`training.metrics`), the reliability diagram's
bins and expected calibration error (Guo et al. 2017: 15 equal-width confidence bins), and which examples the
error gallery shows."""

from __future__ import annotations

import numpy as np
import torch

from ..training.metrics import classification_metrics


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> dict:
    """Per-bin accuracy, mean confidence and count, and ECE = sum_b |B_b|/N * |acc_b - conf_b|."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        acc = float(correct[inside].mean()) if count else None
        conf = float(confidence[inside].mean()) if count else None
        if count:
            ece += count / len(confidence) * abs(acc - conf)
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count, "accuracy": acc,
                     "confidence": conf})
    return {"bins": rows, "ece": float(ece)}


def calibration_report(logits: torch.Tensor, labels: np.ndarray, label_names: list[str], bins: int = 15) -> dict:
    probs = torch.softmax(logits.float(), -1).numpy()
    preds = probs.argmax(-1)
    confidence = probs.max(-1)
    correct = preds == labels
    return {"metrics": classification_metrics(labels, preds, label_names),
            "reliability": reliability(confidence, correct, bins), "errors": int((~correct).sum())}


def gallery(logits: torch.Tensor, labels: np.ndarray, count: int) -> dict[str, list[int]]:
    """Indices of the most confident correct and most confident wrong predictions (`count` in all, half each);
    when there are fewer errors than half, the least confident correct ones fill their place."""
    probs = torch.softmax(logits.float(), -1).numpy()
    confidence, correct = probs.max(-1), probs.argmax(-1) == labels
    by_confidence = np.argsort(-confidence, kind="stable")
    right = [int(i) for i in by_confidence if correct[i]]
    wrong = [int(i) for i in by_confidence if not correct[i]]
    half = count - count // 2
    chosen = {"confident_correct": right[:half], "confident_wrong": wrong[:count // 2]}
    missing = count // 2 - len(chosen["confident_wrong"])
    if missing > 0:
        chosen["least_confident_correct"] = [i for i in reversed(right) if i not in chosen["confident_correct"]][
            :missing]
    return chosen
