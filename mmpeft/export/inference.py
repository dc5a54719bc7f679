"""Classify raw images + texts with a classifier, the way training fed it: one pair at a time (`predict`) or a
whole manifest through the evaluation data pipeline (`predict_manifest`, `mmpeft predict --data`)."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..data.dataset import Collator, encode_texts
from ..data.manifest import eight_bit
from ..errors import DataError, PathExistsError
from ..models.classifier import FusionClassifier


@dataclass
class Predictions:
    """Class probabilities with their label names. `predictions[i]` is `{"label": ..., "probabilities": {name: p}}`
    (classes by decreasing probability); `.probabilities` is the (N, C) tensor in `label_names` order."""

    label_names: list[str]
    probabilities: torch.Tensor

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, i: int) -> dict:
        ranked = sorted(zip(self.label_names, self.probabilities[i].tolist()), key=lambda x: -x[1])
        return {"label": ranked[0][0], "probabilities": dict(ranked)}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def labels(self) -> list[str]:
        return [self.label_names[i] for i in self.probabilities.argmax(dim=-1).tolist()]


@torch.no_grad()
def predict(model: FusionClassifier, images: list, texts: list[str]) -> Predictions:
    """Class probabilities for image paths or PIL images paired with texts, on a loaded (`load_adapter`) or freshly
    built (`build_classifier`) classifier."""
    model.eval()
    probabilities = torch.softmax(model(**encode_batch(model, images, texts)).float(), dim=-1).cpu()
    return Predictions(list(model.label_names), probabilities)


def open_image(image) -> Image.Image:
    """An image path (or PIL image) as RGB; unreadable files and decompression bombs are a `DataError` naming it."""
    if isinstance(image, Image.Image):
        return eight_bit(image, "the given image").convert("RGB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(image) as opened:
                return eight_bit(opened, str(image)).convert("RGB")  # 16-bit PNGs scaled, not clipped white
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"Cannot read image {image}: PIL refuses it as a possible decompression bomb ({err}). Resize "
                        "it below PIL.Image.MAX_IMAGE_PIXELS, or raise that limit if you trust the file.") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"Cannot read image {image}: {err}; expected a complete JPEG/PNG/... file.") from None


def encode_batch(model: FusionClassifier, images: list, texts: list[str]) -> dict[str, torch.Tensor]:
    """A model-ready batch (on the model's device) from image paths or PIL images paired with texts."""
    if len(images) != len(texts):
        raise DataError(f"predict needs one text per image, got {len(images)} images and {len(texts)} texts.")
    backbone = model.source
    max_length = model.config.data.max_text_length or backbone.max_text_length
    tokens = encode_texts(backbone.tokenizer, list(texts), max_length=max_length).input_ids
    items = []
    for i, (image, ids) in enumerate(zip(images, tokens)):
        pixels = backbone.image_processor(images=open_image(image), return_tensors="pt")["pixel_values"][0]
        items.append({"pixel_values": pixels.float(), "input_ids": ids, "labels": -1, "index": i})
    batch = Collator(backbone.tokenizer.pad_token_id, backbone.text_padding, max_length)(items)
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def predict_manifest(model: FusionClassifier, split, output: str | Path, *, overwrite: bool = False,
                     progress: bool = True) -> int:
    """Write one JSON line per example of `split` (a `read_split` result; labels not needed) into `output`: row,
    image, text, predicted label and the probability of each class. Batched through the evaluation data pipeline;
    the file appears only when complete. Returns the number of lines."""
    from tqdm.auto import tqdm

    from ..data.loaders import make_loader

    output = Path(output)
    if output.exists() and not overwrite:
        raise PathExistsError(f"{output} already exists; choose another --output, or pass --overwrite.")
    loader, _ = make_loader(split, None, model.source, model.config.data, train=False)
    device = next(model.parameters()).device
    model.eval()
    partial = output.with_name(f".{output.name}.partial")
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with open(partial, "w", encoding="utf-8") as out:
            for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
                index = batch.pop("index").tolist()
                batch.pop("labels", None)
                logits = model(**{k: v.to(device) for k, v in batch.items()})
                found = Predictions(list(model.label_names), torch.softmax(logits.float(), dim=-1).cpu())
                for i, result in zip(index, found):
                    example = split.examples[i]
                    out.write(json.dumps({"row": example.row, "image": example.image, "text": example.text,
                                          **result}) + "\n")
                    written += 1
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)  # a failed run leaves no half-written file
    return written
