"""Saliency of one prediction, per tower: gradient-weighted attention relevance (Chefer et al. 2021), attention
rollout (Abnar & Zuidema 2020), Grad-CAM on a CNN tower's last stage (Selvaraju et al. 2017) and gradient x input.

Each tower says which methods applied to it and, for each that did not, why (`Saliency.skipped`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .hooks import TowerRecorder, explaining, tower_root

METHODS = ("relevance", "rollout", "gradcam", "gradxinput")
NO_ATTENTION = "no self-attention layers in this tower (a CNN): relevance and rollout need attention maps"
VIT_NO_CAM = "a ViT tower has no convolutional stage after its patch embedding; Grad-CAM is for CNN towers"
NO_CAPTION = "the head never reads the caption"
NO_IMAGE = "the head never reads the image"


@dataclass
class Saliency:
    """One example's maps: image maps on the tower's patch (or feature) grid, text scores per token position."""

    target: int
    probabilities: list[float]
    image: dict[str, np.ndarray] = field(default_factory=dict)
    text: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    special: list[bool] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # "image/gradcam" -> why it does not apply

    def to_dict(self) -> dict:
        return {"target": self.target, "probabilities": self.probabilities, "tokens": self.tokens,
                "image": {k: np.round(v, 5).tolist() for k, v in self.image.items()},
                "text": {k: np.round(v, 5).tolist() for k, v in self.text.items()}, "skipped": self.skipped}


def _positive_weighted(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Chefer's per-layer map: mean over heads of (gradient * attention), negative parts removed."""
    return [(a.grad * a.detach()).clamp_min(0).mean(1).float().cpu() if a.grad is not None else None for a in maps]


def relevance_matrix(maps: list[torch.Tensor]) -> torch.Tensor:
    """R = I; for each layer R <- R + mean_h[(dA * A)+] R (Chefer et al. 2021, eq. 5-6 for self-attention)."""
    weighted = _positive_weighted(maps)
    size = maps[0].shape[-1]
    rel = torch.eye(size).expand(maps[0].shape[0], size, size).clone()
    for a in weighted:
        rel = rel + torch.bmm(a, rel)
    return rel


def rollout_matrix(maps: list[torch.Tensor]) -> torch.Tensor:
    """A_L ... A_1 with each A = (mean_h attention + I) / 2, rows renormalised (Abnar & Zuidema 2020)."""
    size = maps[0].shape[-1]
    eye = torch.eye(size)
    out = eye.expand(maps[0].shape[0], size, size).clone()
    for a in maps:
        step = 0.5 * (a.detach().float().cpu().mean(1) + eye)
        out = torch.bmm(step / step.sum(-1, keepdim=True), out)
    return out


def text_pool_rows(model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) weights over the positions whose state the family pools into the text embedding."""
    rows = torch.zeros(input_ids.shape, dtype=torch.float32)
    family = model.family.name
    if family == "clip":
        eos = model.base.config.text_config.eos_token_id
        where = input_ids.argmax(-1) if eos == 2 else (input_ids == eos).int().argmax(-1)
    elif family == "open_clip":
        where = input_ids.argmax(-1)  # the end-of-text token has the highest id
    elif family == "siglip":
        where = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1)
    elif family == "dual" and model.base.config.pooling == "mean":
        return mask.float() / mask.float().sum(-1, keepdim=True).clamp_min(1)
    else:  # BLIP and dual encoders with CLS pooling
        where = torch.zeros(input_ids.shape[0], dtype=torch.long)
    rows[torch.arange(len(where)), where.cpu()] = 1.0
    return rows


def _grid(count: int) -> tuple[int, bool] | None:
    """(side, has class token) of a square patch layout with or without one leading class token."""
    for cls in (True, False):
        side = math.isqrt(count - cls)
        if side * side == count - cls and side > 0:
            return side, cls
    return None


def _image_attention_maps(rec: TowerRecorder, head_maps: list, out: list[Saliency]) -> None:
    maps = rec.self_attentions()
    layout = _grid(maps[0].shape[-1])
    if layout is None:
        for s in out:
            s.skipped["image/relevance"] = s.skipped["image/rollout"] = (
                f"{maps[0].shape[-1]} tokens are no square patch grid with or without one class token")
        return
    side, cls = layout
    pools = rec.pooling_attentions()  # SigLIP: the attention-pooling head's probe over the patches
    for method, matrix in (("relevance", relevance_matrix), ("rollout", rollout_matrix)):
        full = matrix(maps)
        if cls:
            rows = full[:, 0]
        elif pools:
            pool = _positive_weighted(pools)[-1] if method == "relevance" else pools[-1].detach().float().mean(1)
            rows = torch.bmm(pool[:, :1], full)[:, 0]
        else:
            rows = full.mean(1)
        if method == "relevance" and head_maps:  # cross-attention head: text queries over image tokens
            cross = _positive_weighted(head_maps)[-1]
            if cross is not None and cross.shape[-1] == full.shape[-1]:
                rows = rows + torch.bmm(cross.mean(1, keepdim=True), full)[:, 0]
        patches = rows[:, 1:] if cls else rows
        for s, values in zip(out, patches):
            s.image[method] = values.reshape(side, side).numpy()


def _image_maps(rec: TowerRecorder, pixels: torch.Tensor, head_maps: list, out: list[Saliency]) -> None:
    for s, g, x in zip(out, pixels.grad.float(), pixels.detach().float()):
        s.image["gradxinput"] = (g * x).sum(0).abs().numpy()
    if rec.self_attentions():
        _image_attention_maps(rec, head_maps, out)
        for s in out:
            s.skipped["image/gradcam"] = VIT_NO_CAM
        return
    for s in out:
        s.skipped["image/relevance"] = s.skipped["image/rollout"] = NO_ATTENTION
    fmap = rec.feature_map
    if fmap is None or fmap.grad is None:
        for s in out:
            s.skipped["image/gradcam"] = "no spatial feature map with a gradient was found in this tower"
        return
    weights = fmap.grad.float().mean((2, 3), keepdim=True)
    cams = (weights * fmap.detach().float()).sum(1).clamp_min(0)
    for s, cam in zip(out, cams):
        s.image["gradcam"] = cam.numpy()


def _text_maps(model, rec: TowerRecorder, input_ids, mask, out: list[Saliency]) -> None:
    emb = rec.embeddings
    if emb is not None and emb.grad is not None:
        for s, g, e in zip(out, emb.grad.float(), emb.detach().float()):
            s.text["gradxinput"] = (g * e).sum(-1).numpy()
    maps = rec.self_attentions()
    if not maps:
        for s in out:
            s.skipped["text/relevance"] = s.skipped["text/rollout"] = "no attention maps in the text tower"
        return
    rows = text_pool_rows(model, input_ids.cpu(), mask.cpu())
    for method, matrix in (("relevance", relevance_matrix), ("rollout", rollout_matrix)):
        scores = torch.bmm(rows[:, None], matrix(maps))[:, 0]
        for s, values in zip(out, scores):
            s.text[method] = values.numpy()


def _tokens(model, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[list[str]], list[list[bool]]]:
    tokenizer = model.source.tokenizer
    special = set(tokenizer.all_special_ids)
    words, flags = [], []
    for ids, m in zip(input_ids.tolist(), mask.tolist()):
        words.append([tokenizer.decode([i]).strip() or tokenizer.convert_ids_to_tokens(i) for i in ids])
        flags.append([i in special or not keep for i, keep in zip(ids, m)])
    return words, flags


def saliency_batch(model, batch: dict[str, torch.Tensor], targets: torch.Tensor | None = None) -> list[Saliency]:
    """Saliency of each example of a model-ready batch for `targets` (default: the predicted class)."""
    head = model.head
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    pixels = batch["pixel_values"].to(device).clone().requires_grad_(True)
    with explaining(model):
        with TowerRecorder(tower_root(model, "text"), token_embeddings=True) as text_rec:
            text = model.text_features(ids, mask)
        with TowerRecorder(tower_root(model, "vision")) as image_rec:
            image = model.image_features(pixels)
        with TowerRecorder(head) as head_rec:
            logits = model.fuse(text, image).float()
        targets = logits.argmax(-1) if targets is None else targets.to(logits.device)
        logits.gather(1, targets[:, None]).sum().backward()
        for rec in (text_rec, image_rec, head_rec):
            rec.gradients_to_views()
    probs = torch.softmax(logits.detach(), -1).cpu()
    out = [Saliency(int(t), p.tolist()) for t, p in zip(targets.cpu(), probs)]
    if head.uses_image:
        _image_maps(image_rec, pixels, head_rec.attentions, out)
    else:
        for s in out:
            s.skipped.update({f"image/{m}": NO_IMAGE for m in METHODS})
    if head.uses_text:
        _text_maps(model, text_rec, ids, mask, out)
        for s, words, flags in zip(out, *_tokens(model, ids.cpu(), mask.cpu())):
            s.tokens, s.special = words, flags
        for s in out:
            s.skipped["text/gradcam"] = "Grad-CAM is for convolutional image towers"
    else:
        for s in out:
            s.skipped.update({f"text/{m}": NO_CAPTION for m in METHODS})
    return out


def saliency(model, image, text: str, target: int | None = None) -> Saliency:
    """Saliency of one image (a path or a PIL image) with its caption, for `target` (default: predicted class)."""
    from ..export.inference import encode_batch

    batch = encode_batch(model, [image], [text])
    targets = None if target is None else torch.tensor([target])
    return saliency_batch(model, batch, targets)[0]
