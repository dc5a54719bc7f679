"""`FusionClassifier`: a (peft-wrapped) dual-encoder backbone plus a classifier head."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..backbones import Backbone
from ..backbones.registry import TOWERS, BackboneFamily, TowerOutput
from ..config import Config, HeadConfig, ModelConfig
from ..errors import ConfigError
from ..quant import (
    TORCH_DTYPES,
    QuantizationError,
    cast_unquantized,
    quantize_linears,
    quantized_modules,
    skip_patterns,
)
from .adapters import attach_adapters
from .heads import Head, build_head
from .logit_scale import backbone_logit_scale
from .state_cache import StateCache

logger = logging.getLogger(__name__)


class DualTowers(nn.Module):
    """A (peft-wrapped) backbone whose towers each train as `frozen`, `lora` or `full`: what the classifier and
    the retrieval model share. Frozen towers run without autograd and, like the BatchNorm layers of LoRA towers,
    stay in eval mode."""

    def __init__(self, backbone: nn.Module, family: BackboneFamily, tower_modes: dict[str, str]):
        super().__init__()
        self.backbone = backbone
        self.family = family
        self.tower_modes = dict(tower_modes)
        self.all_towers_with_grad = False

    @property
    def base(self) -> nn.Module:
        """The transformers model, with peft's layers injected where the adapter put them."""
        get = getattr(self.backbone, "get_base_model", None)
        return get() if get else self.backbone

    def _grad_context(self, tower: str):
        if self.tower_modes[tower] == "frozen" and not self.all_towers_with_grad:
            return torch.no_grad()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gradients_everywhere(self):
        """Run every tower with autograd, frozen ones included, inside this block: explanations need gradients
        with respect to inputs and activations, not trainable weights."""
        before, self.all_towers_with_grad = self.all_towers_with_grad, True
        try:
            with torch.enable_grad():
                yield self
        finally:
            self.all_towers_with_grad = before

    # {tower: FeatureCache or StateCache} of the split being run (models/feature_cache.py, models/state_cache.py);
    # None, the default, caches nothing.
    feature_caches: dict | None = None

    def _through_cache(self, tower: str, index: torch.Tensor | None, compute, inputs: dict) -> TowerOutput:
        """`compute()`, or the tower's cached pooled output (`FeatureCache`), or the adapted layers run from the
        cached states below them (`StateCache`). Gradients with respect to the inputs bypass every cache."""
        cache = (self.feature_caches or {}).get(tower)
        if cache is None or index is None or self.all_towers_with_grad:
            return compute()
        if isinstance(cache, StateCache):
            with self._grad_context(tower):
                return cache.output(self.base, index, inputs)
        return cache.output(index, compute)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    index: torch.Tensor | None = None) -> TowerOutput:
        def compute():
            with self._grad_context("text"):
                return self.family.encode_text(self.base, input_ids, attention_mask)

        return self._through_cache("text", index, compute, {"input_ids": input_ids, "attention_mask": attention_mask})

    def encode_image(self, pixel_values: torch.Tensor | None, index: torch.Tensor | None = None) -> TowerOutput:
        def compute():
            with self._grad_context("vision"):
                return self.family.encode_image(self.base, pixel_values)

        return self._through_cache("vision", index, compute, {"pixel_values": pixel_values})

    def train(self, mode: bool = True):
        """Frozen towers stay in eval mode: their dropout and normalisation statistics are not trained. So do the
        BatchNorm layers of LoRA towers: running statistics are buffers, which a LoRA adapter file does not hold."""
        super().train(mode)
        for tower in TOWERS:
            if self.tower_modes[tower] in ("frozen", "lora"):
                for name in self.family.tower_modules[tower]:
                    for module in getattr(self.base, name).modules():
                        if self.tower_modes[tower] == "frozen" or isinstance(module, nn.modules.batchnorm._BatchNorm):
                            module.eval()
        return self


class FusionClassifier(DualTowers):
    """Runs the towers a head needs (frozen towers without autograd) and returns class logits."""

    def __init__(self, backbone: nn.Module, family: BackboneFamily, head: Head, label_names: list[str],
                 tower_modes: dict[str, str]):
        super().__init__(backbone, family, tower_modes)
        self.head = head
        self.label_names = list(label_names)

    def _for_head(self, out: TowerOutput | None) -> TowerOutput | None:
        """Tower outputs in the head's dtype: a bf16 or quantized backbone feeds an fp32 head without autocast."""
        param = next(self.head.parameters(), None)
        if out is None or param is None or out.pooled.dtype == param.dtype:
            return out
        tokens = out.tokens.to(param.dtype) if out.tokens is not None else None  # None: from the feature cache
        return TowerOutput(out.pooled.to(param.dtype), tokens, out.mask)

    def text_features(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                      index: torch.Tensor | None = None) -> TowerOutput | None:
        """What the head reads of the text: the captions' encoding, the class prompts' (a prompt head that
        re-encodes them every step), or None. `index` (the examples' rows) serves a feature cache."""
        if self.head.encodes_prompts and self.head.class_embeds is None:
            return self.encode_text(self.prompt_ids, self.prompt_mask)
        return self.encode_text(input_ids, attention_mask, index) if self.head.uses_text else None

    def image_features(self, pixel_values: torch.Tensor | None, index: torch.Tensor | None = None
                       ) -> TowerOutput | None:
        return self.encode_image(pixel_values, index) if self.head.uses_image else None

    def fuse(self, text: TowerOutput | None, image: TowerOutput | None) -> torch.Tensor:
        """Class logits from tower outputs: the towers and the head can run apart (explanations batch each tower
        over its own inputs)."""
        return self.head(self._for_head(text), self._for_head(image))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_loss: bool = False, index: torch.Tensor | None = None, **_: object):
        """Class logits (B, C); with `return_loss=True` a transformers `SequenceClassifierOutput(loss, logits)`.

        As with `CLIPModel(..., return_loss=True)`, the loss is asked for: batches carry `labels` (and `index`),
        and `model(**batch)` returns the logits tensor that training, evaluation, merge and predict use. The loss
        is the mean cross-entropy in float32 over rows whose label is not -1 (unlabelled rows); the training loop
        computes its own (class weights, label smoothing).
        """
        text, image = self.text_features(input_ids, attention_mask, index), self.image_features(pixel_values, index)
        logits = self.fuse(text, image)
        if not return_loss:
            return logits
        if labels is None:
            raise ValueError("FusionClassifier(return_loss=True) needs `labels` (class ids, -1 for unlabelled rows).")
        from transformers.modeling_outputs import SequenceClassifierOutput

        loss = nn.functional.cross_entropy(logits.float(), labels.to(logits.device), ignore_index=-1)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each encoder layer in the backward pass instead of keeping its activations (non-reentrant).

    Non-reentrant checkpointing hands gradients to LoRA weights inside a layer whether or not the layer's input
    requires grad, so the input-embedding hook transformers adds for the reentrant kind is removed: it would make
    autograd run back through frozen layers below the first trainable one. Frozen towers run in eval mode under
    no_grad, where transformers does not checkpoint.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing; set "
                         "`model.gradient_checkpointing=false`.")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.x
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()


def prepare_quantization(backbone: Backbone, cfg: ModelConfig) -> None:
    """Make the backbone's quantization what `cfg` asks for, and refuse full training of quantized weights.

    A backbone loaded without `quantization=` while the config asks for it is quantized here, in place, with the
    same layers and skip list (`quantize_linears`); loading it quantized instead avoids the full-precision
    loading peak.
    """
    wanted = cfg.quantization
    if wanted is not None and backbone.quantization is None:
        logger.info("quantizing %s after loading (load_backbone(..., quantization=...) would do it while loading)",
                    backbone.name)
        quantize_linears(backbone.model, wanted, skip_patterns(backbone.family, wanted))
        cast_unquantized(backbone.model, TORCH_DTYPES[wanted.compute_dtype if cfg.dtype == "auto" else cfg.dtype])
        backbone.quantization = wanted
    if backbone.quantization is None:
        return
    names = quantized_modules(backbone.model)
    for tower in TOWERS:
        if getattr(cfg, tower).mode == "full" and any(backbone.family.tower_of(n) == tower for n in names):
            raise QuantizationError(
                f"`model.{tower}.mode=full` but the {tower} tower of {backbone.name!r} is loaded in "
                f"{backbone.quantization.bits}-bit, and quantized weights cannot be trained. Use "
                f"`model.{tower}.mode=lora` (QLoRA) or keep this tower out of `model.quantization.towers`."
            )
        if getattr(cfg, tower).mode == "full" and cfg.dtype == "auto":
            # The unquantized parts load in the compute dtype; weights that train keep float32 master copies.
            for name in backbone.family.tower_modules[tower]:
                backbone.model.get_submodule(name).float()


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


def prepare_towers(backbone: Backbone, model_cfg: ModelConfig, lora_config=None) -> tuple[nn.Module, dict[str, str]]:
    """Quantize, attach the peft adapter and switch on checkpointing as `model_cfg` asks: the step every model over
    the towers (classifier, retrieval) starts with. Returns the wrapped backbone and each tower's mode.
    `lora_config`: a saved adapter's own peft config (see `attach_adapters`)."""
    tower_modes = {tower: getattr(model_cfg, tower).mode for tower in TOWERS}
    prepare_quantization(backbone, model_cfg)
    peft_model = attach_adapters(backbone, model_cfg, lora_config)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(backbone.model)
    return peft_model, tower_modes


def build_classifier(backbone: Backbone, cfg: Config, label_names: list[str], *, init_head: bool = True,
                     lora_config=None) -> FusionClassifier:
    """Attach adapters to the backbone as the tower modes ask and put the configured head on top.

    `init_head=False` skips work whose result a saved head overwrites anyway (the prompt encodings);
    `lora_config` is a saved adapter's own peft config (see `attach_adapters`).
    The model keeps the backbone (`model.source`: tokenizer, image processor) and `model.config`, which
    `mmpeft.predict` reads.
    """
    if len(label_names) < 2:
        raise ConfigError(f"A classifier needs at least 2 classes, got {label_names!r}.")
    peft_model, tower_modes = prepare_towers(backbone, cfg.model, lora_config)
    head = build_head(cfg.head, backbone.embed_dims, len(label_names), text_trainable=tower_modes["text"] != "frozen",
                      logit_scale=backbone_logit_scale(backbone.model))
    model = FusionClassifier(peft_model, backbone.family, head, label_names, tower_modes)
    if cfg.head.type == "prompt":
        _attach_prompts(model, backbone, cfg.head, init=init_head)
    _apply_head_mode(model.head, cfg.head)
    model.source, model.config = backbone, cfg
    return model
