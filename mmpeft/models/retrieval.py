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
from .logit_scale import backbone_logit_scale


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
    # The backbone's own scale, fixed (not trained); a family without one gets the default temperature.
    model = RetrievalModel(peft_model, backbone.family, tower_modes, backbone_logit_scale(backbone.model))
    model.source, model.config = backbone, cfg
    return model


def _symmetric_cross_entropy(image_to_text: torch.Tensor, text_to_image: torch.Tensor, targets: torch.Tensor
                             ) -> torch.Tensor:
    return (F.cross_entropy(image_to_text, targets) + F.cross_entropy(text_to_image, targets)) / 2


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy (image->text and text->image) of (B, B) logits whose pairs are on the diagonal."""
    return _symmetric_cross_entropy(logits, logits.t(), torch.arange(len(logits), device=logits.device))


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
    return _symmetric_cross_entropy(logit_scale * image @ all_text.t(), logit_scale * text @ all_image.t(), targets)
