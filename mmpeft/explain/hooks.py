"""What explanations read inside a tower while it runs: attention weights with their gradient, the last spatial
feature map (Grad-CAM) and the token embeddings (gradient x input), captured by forward hooks.

* transformers attention layers return their weights only under eager attention (SDPA gives none, with only a
  warning), so `explaining` switches every transformers model inside to eager for its duration;
* `nn.MultiheadAttention` (open_clip, SigLIP's attention-pooling head, mmpeft's cross-attention head) is called with
  `need_weights=False` or averaged heads: a forward pre-hook asks it for per-head weights. With `need_weights=True`
  torch computes the weights explicitly and multiplies the values by that very tensor, so the returned weights carry
  the true gradient - but it returns them as a view `(B, H, L, S)` of the `(B*H, L, S)` tensor it used, and
  autograd hands gradients to the tensor used, not to the view: `gradients_to_views` copies them over after
  `backward` (`Tensor._base` is the view's base). peft's LoRA wrapper passes the keywords through to the layer.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..models.precision import restore_attention, set_attention


@contextlib.contextmanager
def explaining(model):
    """Eval mode, eager attention in every transformers model inside, every tower with autograd; all restored."""
    was_training = model.training
    model.eval()
    switched = []
    try:
        switched = set_attention(model.base, "eager")
        with model.gradients_everywhere():
            yield model
    finally:
        restore_attention(switched)
        model.train(was_training)


class TowerRecorder:
    """Forward hooks on one module tree: attention maps (B, H, L, S) in forward order, the last feature map
    (B, C, H, W) with H*W > 1, and the output of its largest `nn.Embedding` (the token embeddings) made a
    gradient leaf. Every kept tensor retains its gradient for after `backward`."""

    def __init__(self, root: nn.Module, token_embeddings: bool = False):
        self.root = root
        self.token_embeddings = token_embeddings
        self.attentions: list[torch.Tensor] = []
        self.feature_map: torch.Tensor | None = None
        self.embeddings: torch.Tensor | None = None
        self._seen: set[int] = set()
        self._handles = []

    def _keep_attention(self, weights) -> None:
        if torch.is_tensor(weights) and weights.dim() in (3, 4) and id(weights) not in self._seen:
            self._seen.add(id(weights))
            weights = weights if weights.dim() == 4 else weights.unsqueeze(1)
            if weights.requires_grad:
                weights.retain_grad()
                base = weights._base
                if base is not None and base.requires_grad:
                    base.retain_grad()
            self.attentions.append(weights)

    def _on_output(self, module, args, output):
        if isinstance(output, tuple) and len(output) > 1 and torch.is_tensor(output[1]) and output[1].dim() == 4:
            self._keep_attention(output[1])
        elif torch.is_tensor(output) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            if output.requires_grad:
                output.retain_grad()
            self.feature_map = output

    @staticmethod
    def _ask_weights(module, args, kwargs):
        kwargs["need_weights"] = True
        kwargs["average_attn_weights"] = False
        return args, kwargs

    def _on_embedding(self, module, args, output):
        leaf = output.detach().requires_grad_(True)
        self.embeddings = leaf
        return leaf.clone()  # BLIP adds position embeddings in place, which a leaf forbids

    def __enter__(self) -> TowerRecorder:
        for module in self.root.modules():
            if isinstance(module, nn.MultiheadAttention):
                self._handles.append(module.register_forward_pre_hook(self._ask_weights, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._on_output))
        if self.token_embeddings:
            embeddings = [m for m in self.root.modules() if isinstance(m, nn.Embedding)]
            if embeddings:
                largest = max(embeddings, key=lambda m: m.num_embeddings)
                self._handles.append(largest.register_forward_hook(self._on_embedding))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def gradients_to_views(self) -> None:
        """After `backward`: give each kept view the gradient its base tensor received (see the module docstring)."""
        for weights in self.attentions:
            base = weights._base
            if weights.grad is None and base is not None and base.grad is not None:
                weights.grad = base.grad.reshape(weights.shape)

    def self_attentions(self) -> list[torch.Tensor]:
        """The square maps (self-attention layers), in forward order."""
        return [a for a in self.attentions if a.shape[-1] == a.shape[-2]]

    def pooling_attentions(self) -> list[torch.Tensor]:
        """Non-square maps: a learned query attending to the tokens (SigLIP's pooling head, cross-attention)."""
        return [a for a in self.attentions if a.shape[-1] != a.shape[-2]]


def tower_root(model, tower: str) -> nn.Module:
    """The module tree of one tower (its first top-level module, e.g. `vision_model`, `visual`, `text`)."""
    return model.base.get_submodule(model.family.tower_modules[tower][0])
