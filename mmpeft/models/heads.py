"""Classifier heads over the two towers' outputs: concat, gated, cross_attention, text_only, image_only, prompt."""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.registry import TowerOutput
from ..config import HEAD_SPECS, HeadConfig
from ..errors import ConfigError
from .logit_scale import DEFAULT_LOGIT_SCALE


def _classifier(in_dim: int, cfg: HeadConfig, num_classes: int) -> nn.Module:
    """A linear layer (hidden=0, the brief's head) or a one-hidden-layer MLP."""
    if cfg.hidden == 0:
        return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(in_dim, num_classes))
    return nn.Sequential(
        nn.Linear(in_dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, num_classes)
    )


def _maybe_normalize(x: torch.Tensor, cfg: HeadConfig) -> torch.Tensor:
    return F.normalize(x, dim=-1) if cfg.normalize else x


class Head(nn.Module, abc.ABC):
    """Base: `forward` maps the towers' outputs to class logits. Which towers it reads comes from its type's
    `HeadSpec` (`build_head` sets `uses_text` / `uses_image`); `encodes_prompts`: the text tower encodes the class
    prompts instead of each example's caption."""

    uses_text = True
    uses_image = True
    encodes_prompts = False

    @abc.abstractmethod
    def forward(self, text: TowerOutput | None, image: TowerOutput | None) -> torch.Tensor:
        """Class logits (B, C) from the towers' outputs (None for a tower the head does not read)."""


class ConcatHead(Head):
    """The brief's fusion: concatenated pooled embeddings into a linear layer or an MLP."""

    def __init__(self, cfg: HeadConfig, dims: dict[str, int], num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.classifier = _classifier(dims["text"] + dims["vision"], cfg, num_classes)

    def forward(self, text, image):
        fused = torch.cat([_maybe_normalize(text.pooled, self.cfg), _maybe_normalize(image.pooled, self.cfg)], -1)
        return self.classifier(fused)


class GatedHead(Head):
    """Per-sample learned weights over the two modalities; `last_gates` keeps them for explanations."""

    def __init__(self, cfg: HeadConfig, dims: dict[str, int], num_classes: int):
        super().__init__()
        self.cfg = cfg
        width = cfg.hidden or max(dims["text"], dims["vision"])
        self.text_proj = nn.Linear(dims["text"], width)
        self.image_proj = nn.Linear(dims["vision"], width)
        self.gate = nn.Linear(dims["text"] + dims["vision"], 2)
        self.classifier = nn.Sequential(nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(width, num_classes))
        self.last_gates: torch.Tensor | None = None

    def forward(self, text, image):
        t, i = _maybe_normalize(text.pooled, self.cfg), _maybe_normalize(image.pooled, self.cfg)
        gates = torch.softmax(self.gate(torch.cat([t, i], -1)), dim=-1)
        self.last_gates = gates.detach()
        fused = gates[:, :1] * self.text_proj(t) + gates[:, 1:] * self.image_proj(i)
        return self.classifier(fused)


class CrossAttentionHead(Head):
    """Text tokens attend to image patches; the attended text, mean-pooled over real tokens, is classified
    together with both pooled embeddings (so a full tower's pooling layers train too)."""

    def __init__(self, cfg: HeadConfig, dims: dict[str, int], num_classes: int):
        super().__init__()
        self.cfg = cfg
        width = cfg.hidden or dims["text_tokens"]
        if width % cfg.attention_heads:
            raise ConfigError(f"`head.hidden={width}` must be divisible by `head.attention_heads={cfg.attention_heads}`.")
        self.text_in = nn.Linear(dims["text_tokens"], width)
        self.image_in = nn.Linear(dims["vision_tokens"], width)
        self.attention = nn.MultiheadAttention(width, cfg.attention_heads, dropout=cfg.dropout, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Sequential(
            nn.Dropout(cfg.dropout), nn.Linear(width + dims["text"] + dims["vision"], num_classes)
        )
        self.last_attention: torch.Tensor | None = None

    def forward(self, text, image):
        query = self.text_in(text.tokens)
        memory = self.image_in(image.tokens)
        attended, weights = self.attention(query, memory, memory, need_weights=True)
        self.last_attention = weights.detach()
        hidden = self.norm(query + attended)
        mask = text.mask.to(hidden.dtype).unsqueeze(-1) if text.mask is not None else torch.ones_like(hidden[..., :1])
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        fused = [pooled, _maybe_normalize(text.pooled, self.cfg), _maybe_normalize(image.pooled, self.cfg)]
        return self.classifier(torch.cat(fused, -1))


class UnimodalHead(Head):
    """A baseline that reads one modality only (the other tower is never run)."""

    def __init__(self, cfg: HeadConfig, dims: dict[str, int], num_classes: int, modality: str):
        super().__init__()
        self.cfg = cfg
        self.modality = modality
        self.classifier = _classifier(dims[modality], cfg, num_classes)

    def forward(self, text, image):
        pooled = text.pooled if self.modality == "text" else image.pooled
        return self.classifier(_maybe_normalize(pooled, self.cfg))


class PromptHead(Head):
    """CLIP-style image classification: cosine similarity to class-prompt embeddings, scaled.

    With a frozen text tower the class embeddings are a parameter initialised from the prompts (step 0 is
    zero-shot CLIP); with a trainable text tower they are re-encoded every step and passed in as `text`.
    """

    encodes_prompts = True

    def __init__(self, num_classes: int, dim: int, logit_scale: float, static: bool):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)).log())
        self.class_embeds = nn.Parameter(torch.zeros(num_classes, dim)) if static else None

    def forward(self, text, image):
        classes = self.class_embeds if self.class_embeds is not None else text.pooled
        image_embeds = F.normalize(image.pooled, dim=-1)
        return self.logit_scale.exp() * image_embeds @ F.normalize(classes, dim=-1).t()


def _unimodal(modality: str):
    return lambda cfg, dims, num_classes, **_: UnimodalHead(cfg, dims, num_classes, modality)


def _prompt(cfg: HeadConfig, dims: dict[str, int], num_classes: int, *, text_trainable: bool, logit_scale: float):
    if dims["text"] != dims["vision"]:
        raise ConfigError(f"`head.type=prompt` needs text and image embeddings of one width, got "
                          f"{dims['text']} and {dims['vision']}.")
    return PromptHead(num_classes, dims["vision"], logit_scale, static=not text_trainable)


# One builder per head type of `HEAD_SPECS` (the table of what each head reads, in the config).
HEADS = {
    "concat": lambda cfg, dims, num_classes, **_: ConcatHead(cfg, dims, num_classes),
    "gated": lambda cfg, dims, num_classes, **_: GatedHead(cfg, dims, num_classes),
    "cross_attention": lambda cfg, dims, num_classes, **_: CrossAttentionHead(cfg, dims, num_classes),
    "text_only": _unimodal("text"),
    "image_only": _unimodal("vision"),
    "prompt": _prompt,
}
assert set(HEADS) == set(HEAD_SPECS), "every head type in HEAD_SPECS needs a builder here"


def build_head(cfg: HeadConfig, dims: dict[str, int], num_classes: int, *, text_trainable: bool = False,
               logit_scale: float = DEFAULT_LOGIT_SCALE) -> Head:
    """Construct the configured head; the prompt head's class embeddings are filled in by the model."""
    if cfg.type not in HEADS:
        raise ConfigError(f"Unknown head type {cfg.type!r}; known: {sorted(HEADS)}.")
    head = HEADS[cfg.type](cfg, dims, num_classes, text_trainable=text_trainable, logit_scale=logit_scale)
    spec = HEAD_SPECS[cfg.type]
    head.uses_text = "text" in spec.towers and not head.encodes_prompts
    head.uses_image = "vision" in spec.towers
    return head
