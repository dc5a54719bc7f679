"""`FusionClassifier`: a (peft-wrapped) dual-encoder backbone plus a classifier head."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .adapters import attach_adapters
from .backbones import Backbone
from .backbones.registry import TOWERS, BackboneFamily, TowerOutput
from .config import Config, HeadConfig
from .heads import Head, PromptHead, build_head


class FusionClassifier(nn.Module):
    """Runs the towers a head needs (frozen towers without autograd) and returns class logits."""

    def __init__(self, backbone: nn.Module, family: BackboneFamily, head: Head, label_names: list[str],
                 tower_modes: dict[str, str]):
        super().__init__()
        self.backbone = backbone
        self.family = family
        self.head = head
        self.label_names = list(label_names)
        self.tower_modes = dict(tower_modes)

    @property
    def base(self) -> nn.Module:
        """The transformers model, with peft's layers injected where the adapter put them."""
        get = getattr(self.backbone, "get_base_model", None)
        return get() if get else self.backbone

    def _grad_context(self, tower: str):
        return torch.no_grad() if self.tower_modes[tower] == "frozen" else contextlib.nullcontext()

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
        with self._grad_context("text"):
            return self.family.encode_text(self.base, input_ids, attention_mask)

    def encode_image(self, pixel_values: torch.Tensor) -> TowerOutput:
        with self._grad_context("vision"):
            return self.family.encode_image(self.base, pixel_values)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        if isinstance(self.head, PromptHead) and self.head.class_embeds is None:
            text = self.encode_text(self.prompt_ids, self.prompt_mask)
        else:
            text = self.encode_text(input_ids, attention_mask) if self.head.uses_text else None
        image = self.encode_image(pixel_values) if self.head.uses_image else None
        return self.head(text, image)

    def train(self, mode: bool = True) -> FusionClassifier:
        """Frozen towers stay in eval mode: their dropout and normalisation statistics are not trained."""
        super().train(mode)
        for tower in TOWERS:
            if self.tower_modes[tower] == "frozen":
                for name in self.family.tower_modules[tower]:
                    getattr(self.base, name).eval()
        return self


def _tokenize(backbone: Backbone, texts: list[str]) -> dict[str, torch.Tensor]:
    padding = "max_length" if backbone.text_padding == "max_length" else "longest"
    return backbone.tokenizer(texts, padding=padding, truncation=True, max_length=backbone.max_text_length,
                              return_tensors="pt")


def _attach_prompts(model: FusionClassifier, backbone: Backbone, cfg: HeadConfig, init: bool) -> None:
    """Tokenise one prompt per class; a static prompt head starts from their embeddings (zero-shot)."""
    tokens = _tokenize(backbone, [cfg.prompt_template.format(name) for name in model.label_names])
    model.register_buffer("prompt_ids", tokens["input_ids"], persistent=False)
    model.register_buffer("prompt_mask", tokens["attention_mask"], persistent=False)
    if init and model.head.class_embeds is not None:
        with torch.no_grad():
            model.head.class_embeds.copy_(model.encode_text(model.prompt_ids, model.prompt_mask).pooled.float())


def _apply_head_mode(head: nn.Module, cfg: HeadConfig) -> None:
    if cfg.mode == "frozen":
        head.requires_grad_(False)
    elif cfg.mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        linears = [n for n, m in head.named_modules() if type(m) is nn.Linear]
        lora = cfg.lora
        inject_adapter_in_model(
            LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=lora.use_dora,
                       target_modules=linears, **lora.extra),
            head,
        )
        for name, param in head.named_parameters():
            param.requires_grad_("lora_" in name)


def build_classifier(backbone: Backbone, cfg: Config, label_names: list[str], *, init_head: bool = True
                     ) -> FusionClassifier:
    """Attach adapters to the backbone as the tower modes ask and put the configured head on top.

    `init_head=False` skips work whose result a saved head overwrites anyway (the prompt encodings).
    """
    if len(label_names) < 2:
        raise ValueError(f"A classifier needs at least 2 classes, got {label_names!r}.")
    tower_modes = {tower: getattr(cfg.model, tower).mode for tower in TOWERS}
    peft_model = attach_adapters(backbone, cfg.model)
    logit_scale = getattr(backbone.model, "logit_scale", None)
    head = build_head(
        cfg.head, backbone.embed_dims, len(label_names),
        text_trainable=tower_modes["text"] != "frozen",
        logit_scale=float(logit_scale.exp()) if logit_scale is not None else 100.0,
    )
    model = FusionClassifier(peft_model, backbone.family, head, label_names, tower_modes)
    if cfg.head.type == "prompt":
        _attach_prompts(model, backbone, cfg.head, init=init_head)
    _apply_head_mode(model.head, cfg.head)
    return model
