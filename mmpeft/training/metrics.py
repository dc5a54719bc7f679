"""Classification metrics from a confusion matrix: accuracy, macro / weighted precision, recall and F1.

The Hub's `evaluate` metric scripts cannot be fetched offline, and they are thin wrappers over the same
arithmetic; computing it here keeps evaluation offline and exact (tests cross-check scikit-learn).
"""

from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return matrix


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Zero where the denominator is zero (scikit-learn's `zero_division=0`)."""
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def classification_metrics(labels, preds, label_names: list[str]) -> dict:
    """Accuracy, macro and weighted precision / recall / F1, a per-class report and the confusion matrix."""
    matrix = confusion_matrix(labels, preds, len(label_names))
    true_pos = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    precision = _safe_div(true_pos, predicted)
    recall = _safe_div(true_pos, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = support.sum()
    weights = support / total if total else np.zeros_like(support)
    result = {
        "accuracy": float(true_pos.sum() / total) if total else 0.0,
        "num_samples": int(total),
        "confusion_matrix": matrix.tolist(),
        "labels": list(label_names),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(label_names, precision, recall, f1, support)
        },
    }
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        result[f"macro_{name}"] = float(values.mean())
        result[f"weighted_{name}"] = float((values * weights).sum())
    return result


def format_report(metrics: dict) -> str:
    """A per-class table like scikit-learn's `classification_report`, plus the averages."""
    width = max(12, *(len(n) for n in metrics["labels"]))
    lines = [f"{'':>{width}}  precision  recall      f1  support"]
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:>{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  "
                     f"{row['support']:7d}")
    for avg in ("macro", "weighted"):
        lines.append(f"{avg + ' avg':>{width}}  {metrics[f'{avg}_precision']:9.4f}  {metrics[f'{avg}_recall']:6.4f}  "
                     f"{metrics[f'{avg}_f1']:6.4f}  {metrics['num_samples']:7d}")
    lines.append(f"{'accuracy':>{width}}  {metrics['accuracy']:9.4f}")
    return "\n".join(lines)


RECALL_AT = (1, 5, 10)


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, *, logit_scale: float,
                      ks: tuple[int, ...] = RECALL_AT, chunk: int = 1024) -> dict:
    """Recall@k both ways and the split's contrastive loss, from normalised embeddings paired row by row.

    A query's hit is its own pair only: another caption identical to the paired one (duplicate captions) is a
    different candidate, and ties count against the pair (a candidate scoring equal to the paired one ranks
    above it), so a collapsed model that embeds everything alike scores 0, not 1. Rows of the (N, N)
    similarity are computed `chunk` at a time.
    """
    n = len(image)
    metrics, losses = {}, []
    for direction, queries, keys in (("i2t", image, text), ("t2i", text, image)):
        ranks = []
        for start in range(0, n, chunk):
            sim = queries[start:start + chunk].float() @ keys.float().t()  # (c, N)
            rows = torch.arange(len(sim))
            paired = sim[rows, rows + start]
            ahead = sim >= paired[:, None]
            ahead[rows, rows + start] = False
            ranks.append(ahead.sum(1))  # 0 = the pair comes first
            losses.append(torch.logsumexp(logit_scale * sim, dim=1) - logit_scale * paired)
        rank = torch.cat(ranks)
        for k in ks:
            metrics[f"{direction}_recall@{k}"] = float((rank < k).float().mean())
    metrics["recall_mean"] = sum(metrics.values()) / len(metrics)
    metrics["loss"] = float(torch.cat(losses).mean())  # = contrastive_loss over the whole split
    metrics["num_samples"] = n
    return metrics


def format_retrieval_report(metrics: dict, ks: tuple[int, ...] = RECALL_AT) -> str:
    """Recall@k as a small table: one row per direction, then the mean and the loss."""
    lines = [f"{'':>12}" + "".join(f"{f'R@{k}':>8}" for k in ks)]
    for direction, name in (("i2t", "image->text"), ("t2i", "text->image")):
        lines.append(f"{name:>12}" + "".join(f"{metrics[f'{direction}_recall@{k}']:8.4f}" for k in ks))
    lines.append(f"{'mean recall':>12}{metrics['recall_mean']:8.4f}   (loss {metrics['loss']:.4f}, "
                 f"{metrics['num_samples']} pairs)")
    return "\n".join(lines)
