"""Image-caption retrieval: a dual encoder tuned with the symmetric contrastive (CLIP) loss, scored by recall@k.

The towers train as for classification (frozen / LoRA / full, through the same peft adapter); there is no head.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..backbones.registry import BackboneFamily
from ..config import Config
from ..errors import ConfigError
from .classifier import DualTowers, prepare_towers

# A family without a learned logit scale (dual encoders, BLIP's transformers port) gets CLIP's initial
# temperature, 1 / 0.07: fixed, not trained.
DEFAULT_LOGIT_SCALE = 1 / 0.07
RECALL_AT = (1, 5, 10)


class RetrievalModel(DualTowers):
    """Both towers of a (peft-wrapped) backbone; `forward` gives the batch's image-to-text logits (B, B)."""

    def __init__(self, backbone: nn.Module, family: BackboneFamily, tower_modes: dict[str, str], logit_scale: float):
        super().__init__(backbone, family, tower_modes)
        self.logit_scale = float(logit_scale)  # the backbone's own, read once: it is not trained

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image, text) embeddings, each (B, D), in float32."""
        image = self.encode_image(pixel_values).pooled
        text = self.encode_text(input_ids, attention_mask).pooled
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, *, embed: bool = False, **_: object):
        """Scaled cosine similarities, image i (row) against caption j (column); `embed=True`: the embeddings.

        Evaluation asks for embeddings through `forward` (not `.embed`) so that DDP / FSDP wrappers run.
        """
        image, text = self.embed(input_ids, attention_mask, pixel_values)
        if embed:
            return image, text
        return self.logit_scale * image @ text.t()


def build_retrieval_model(backbone: Backbone, cfg: Config, lora_config=None) -> RetrievalModel:
    """Attach adapters to the backbone as the tower modes ask (the classifier's code path); `cfg.head` is unused.
    `lora_config`: a saved adapter's own peft config (see `attach_adapters`)."""
    dims = backbone.embed_dims
    if dims["text"] != dims["vision"]:
        raise ConfigError(f"`task=retrieval` compares text and image embeddings, but {backbone.name!r} embeds text in "
                         f"{dims['text']} and images in {dims['vision']} dimensions: use a backbone with a shared "
                         "embedding space (CLIP, SigLIP, BLIP, open_clip).")
    peft_model, tower_modes = prepare_towers(backbone, cfg.model, lora_config)
    scale = getattr(backbone.model, "logit_scale", None)
    logit_scale = float(scale.detach().float().exp()) if scale is not None else DEFAULT_LOGIT_SCALE
    model = RetrievalModel(peft_model, backbone.family, tower_modes, logit_scale)
    model.source, model.config = backbone, cfg
    return model


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy (image->text and text->image) of (B, B) logits whose pairs are on the diagonal."""
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def contrastive_loss_across_processes(image: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """The contrastive loss of this process's pairs against the captions and images of every process.

    Each process scores its own B pairs (rows) against all N * B candidates (columns), so a batch of B per
    process has the negatives of one batch of N * B, as in open_clip's `gather_with_grad` + `local_loss`. The
    gathered embeddings keep their gradient (it flows back to the process that computed them), and the data
    parallel wrapper's gradient average then gives exactly the gradient of one process with the whole batch.
    One process: `contrastive_loss` of the batch's logits. Every process must hold the same B (Accelerate's
    `even_batches`, on by default, pads the last batch).
    """
    offset, all_image, all_text = 0, image, text
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        offset = dist.get_rank() * len(image)
        all_image, all_text = (torch.cat(dist_nn.all_gather(x)) for x in (image, text))
    targets = torch.arange(len(image), device=image.device) + offset
    image_to_text, text_to_image = logit_scale * image @ all_text.t(), logit_scale * text @ all_image.t()
    return (F.cross_entropy(image_to_text, targets) + F.cross_entropy(text_to_image, targets)) / 2


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


def format_retrieval_report(metrics: dict, ks: tuple[int, ...] = RECALL_AT) -> str:
    """Recall@k as a small table: one row per direction, then the mean and the loss."""
    lines = [f"{'':>12}" + "".join(f"{f'R@{k}':>8}" for k in ks)]
    for direction, name in (("i2t", "image->text"), ("t2i", "text->image")):
        lines.append(f"{name:>12}" + "".join(f"{metrics[f'{direction}_recall@{k}']:8.4f}" for k in ks))
    lines.append(f"{'mean recall':>12}{metrics['recall_mean']:8.4f}   (loss {metrics['loss']:.4f}, "
                 f"{metrics['num_samples']} pairs)")
    return "\n".join(lines)
