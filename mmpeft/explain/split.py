"""A labelled split read for explanation: its loader in manifest order, labels, optional groups (e.g. the world's
`decided_by`) and each tower's outputs computed once, so that modalities can be re-paired without re-encoding."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones.registry import TowerOutput
from ..data.loaders import make_loader
from ..data.manifest import Example, read_column, read_split
from ..errors import DataError


@dataclass
class ExplainSplit:
    examples: list[Example]
    labels: np.ndarray
    label_names: list[str]
    groups: list[str] | None  # one value per example of `group_column`, when the manifest has it
    group_column: str | None
    loader: object
    source: str


def load_split(model, manifest: str, *, group_column: str | None = "decided_by", batch_size: int | None = None,
               limit: int | None = None, skip_bad_rows: bool = False) -> ExplainSplit:
    """Read and check a labelled manifest with the model's data settings (labels must be the model's classes)."""
    cfg = model.config.data
    split = read_split(manifest, image_column=cfg.image_column, text_column=cfg.text_column,
                       label_column=cfg.label_column, require_labels=True, label_names=model.label_names,
                       check_images=cfg.check_images, skip_bad_rows=skip_bad_rows,
                       allow_outside_root=cfg.allow_outside_root, require_text=model.config.head.reads_captions)
    unlabelled = [ex.row for ex in split.examples if ex.label is None]
    if unlabelled:
        raise DataError(f"{manifest}: rows {unlabelled[:10]} have no label; explanation compares predictions with "
                        f"labels ({', '.join(model.label_names)}).")
    if limit is not None:
        split.examples = split.examples[:limit]
    groups = read_column(manifest, group_column) if group_column else None
    data_cfg = dataclasses.replace(cfg, num_workers=0, eval_batch_size=batch_size or cfg.eval_batch_size or
                                   cfg.batch_size)
    loader, _ = make_loader(split, model.label_names, model.source, data_cfg, train=False)
    index = {name: i for i, name in enumerate(model.label_names)}
    return ExplainSplit(
        examples=split.examples, labels=np.array([index[ex.label] for ex in split.examples]),
        label_names=list(model.label_names),
        groups=[str(groups.get(ex.row)) for ex in split.examples] if groups else None,
        group_column=group_column if groups else None, loader=loader, source=str(manifest))


@dataclass
class CachedTower:
    """One tower's outputs for every example, token states zero-padded to one length (mask 0 beyond)."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor | None

    @classmethod
    def concat(cls, outs: list[TowerOutput]) -> CachedTower:
        width = max(o.tokens.shape[1] for o in outs)

        def pad(x, value=0):
            return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1]), value=value)

        masks = None if outs[0].mask is None else torch.cat([pad(o.mask) for o in outs])
        return cls(torch.cat([o.pooled for o in outs]), torch.cat([pad(o.tokens) for o in outs]), masks)

    def take(self, index) -> TowerOutput:
        return TowerOutput(self.pooled[index], self.tokens[index], None if self.mask is None else self.mask[index])


@dataclass
class Encoded:
    """Both towers' outputs and the logits of a whole split; `text` is None for a head that reads no caption,
    `constant_text` the class prompts a prompt head re-encodes; `gates` the gated head's (N, 2) weights."""

    text: CachedTower | None
    image: CachedTower | None
    constant_text: TowerOutput | None
    logits: torch.Tensor
    gates: torch.Tensor | None

    def fuse(self, model, text_index, image_index) -> torch.Tensor:
        text = self.text.take(text_index) if self.text is not None else self.constant_text
        image = self.image.take(image_index) if self.image is not None else None
        return model.fuse(text, image).float()


@torch.no_grad()
def encode_split(model, split: ExplainSplit, progress: bool = True) -> Encoded:
    """Run each tower over the split once (the head too), in manifest order."""
    model.eval()
    device = next(model.parameters()).device
    texts, images, logits, gates = [], [], [], []
    for batch in tqdm(split.loader, desc="encoding", disable=not progress, leave=False):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        text = model.text_features(ids, mask)
        image = model.image_features(batch["pixel_values"].to(device))
        logits.append(model.fuse(text, image).float().cpu())
        if getattr(model.head, "last_gates", None) is not None:
            gates.append(model.head.last_gates.float().cpu())
        if model.head.uses_text and text is not None:
            texts.append(text)
        if image is not None:
            images.append(image)
    constant = None if model.head.uses_text else model.text_features(None, None)
    return Encoded(CachedTower.concat(texts) if texts else None, CachedTower.concat(images) if images else None,
                   constant, torch.cat(logits), torch.cat(gates) if gates else None)
