"""Classify raw images + texts with a loaded classifier, the way training fed it."""

from __future__ import annotations

import torch
from PIL import Image

from ..data.dataset import Collator, encode_texts
from ..errors import DataError
from ..models.classifier import FusionClassifier


@torch.no_grad()
def predict(model: FusionClassifier, images: list, texts: list[str]) -> torch.Tensor:
    """Class probabilities (N, C) for image paths or PIL images paired with texts."""
    model.eval()
    return torch.softmax(model(**encode_batch(model, images, texts)).float(), dim=-1).cpu()


def encode_batch(model: FusionClassifier, images: list, texts: list[str]) -> dict[str, torch.Tensor]:
    """A model-ready batch (on the model's device) from image paths or PIL images paired with texts."""
    if len(images) != len(texts):
        raise DataError(f"predict needs one text per image, got {len(images)} images and {len(texts)} texts.")
    backbone = model.source
    max_length = model.config.data.max_text_length or backbone.max_text_length
    tokens = encode_texts(backbone.tokenizer, list(texts), max_length=max_length).input_ids
    items = []
    for i, (image, ids) in enumerate(zip(images, tokens)):
        if not isinstance(image, Image.Image):
            try:
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            except (OSError, SyntaxError) as err:
                raise DataError(f"Cannot read image {image}: {err}") from None
        pixels = backbone.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        items.append({"pixel_values": pixels.float(), "input_ids": ids, "labels": -1, "index": i})
    batch = Collator(backbone.tokenizer.pad_token_id, backbone.text_padding, max_length)(items)
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}
