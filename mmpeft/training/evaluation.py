"""Evaluation across processes: logits gathered once per sample (`gather_for_metrics`), then metrics."""

from __future__ import annotations

import torch
from torch import nn

from .metrics import classification_metrics, retrieval_metrics

PER_EXAMPLE = "per_example"  # a key of `evaluate`'s metrics that the loop writes to `test_predictions.jsonl`


@torch.no_grad()
def predict_logits(model: nn.Module, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, labels and example indices of a whole split, on every process, each sample exactly once."""
    was_training = model.training
    model.eval()
    logits, labels, index = [], [], []
    for batch in loader:
        out = model(**batch)
        out, batch_labels, batch_index = accelerator.gather_for_metrics((out, batch["labels"], batch["index"]))
        logits.append(out.float().cpu())
        labels.append(batch_labels.cpu())
        index.append(batch_index.cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels), torch.cat(index)


def evaluate(model: nn.Module, loader, accelerator, label_names: list[str],
             loss_fn: nn.Module | None = None, *, per_example: bool = False) -> dict:
    """Classification metrics of one split (plus the mean loss when `loss_fn` is given). With `per_example`,
    `metrics[PER_EXAMPLE]` is every example's manifest index, label and prediction (by index), for paired tests."""
    logits, labels, index = predict_logits(model, loader, accelerator)
    predicted = logits.argmax(-1)
    metrics = classification_metrics(labels.numpy(), predicted.numpy(), label_names)
    if loss_fn is not None:
        metrics["loss"] = float(loss_fn(logits, labels))
    if per_example:
        order = index.argsort()
        metrics[PER_EXAMPLE] = [{"index": int(i), "label": label_names[int(y)], "predicted": label_names[int(p)]}
                                for i, y, p in zip(index[order], labels[order], predicted[order])]
    return metrics


@torch.no_grad()
def embed_split(model: nn.Module, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) embeddings of a whole split on every process, each example once, in manifest order."""
    was_training = model.training
    model.eval()
    images, texts, index = [], [], []
    for batch in loader:
        image, text = model(**batch, embed=True)
        image, text, batch_index = accelerator.gather_for_metrics((image, text, batch["index"]))
        images.append(image.float().cpu())
        texts.append(text.float().cpu())
        index.append(batch_index.cpu())
    model.train(was_training)
    order = torch.cat(index).argsort()
    return torch.cat(images)[order], torch.cat(texts)[order]


def evaluate_retrieval(model: nn.Module, loader, accelerator) -> dict:
    """Recall@1/5/10 image->text and text->image, their mean (`recall_mean`) and the contrastive loss of a split."""
    image, text = embed_split(model, loader, accelerator)
    return retrieval_metrics(image, text, logit_scale=accelerator.unwrap_model(model).logit_scale)
