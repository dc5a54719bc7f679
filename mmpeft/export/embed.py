"""Inference for retrieval models: `mmpeft embed` (a manifest's images and captions to an embeddings file) and
`mmpeft search` (a caption to its nearest images, an image to its nearest captions).

The embeddings file is safetensors: `image` and `text` (N, D) float32, L2-normalised, row i from the manifest's
i-th usable row; `row` (N,) its row number in the manifest. Its metadata records the model folder and its weights
fingerprint, the manifest, and every row's image path and caption, so a search needs nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..data.dataset import Collator, encode_texts
from ..data.loaders import make_loader
from ..data.manifest import eight_bit, read_split
from ..errors import DataError, MissingPathError, PathExistsError
from ..models.retrieval import RetrievalModel
from ..models.saving import load_retrieval_model

FORMAT = "mmpeft-embeddings-1"
KINDS = ("image", "text")


def default_output(model_dir: str | Path, manifest: str | Path) -> Path:
    return Path(model_dir) / f"embeddings-{Path(manifest).stem}.safetensors"


@torch.no_grad()
def embed_manifest(model_dir: str | Path, manifest: str | Path, output: str | Path | None = None, *,
                   kinds: tuple[str, ...] = KINDS, batch_size: int | None = None, num_workers: int = 0,
                   skip_bad_rows: bool = False, overwrite: bool = False, base: str | None = None,
                   trust_pickle_weights: bool = False) -> dict:
    """Embed the images and/or captions of `manifest` with the retrieval model saved in `model_dir`; returns a
    summary (output path, rows, width, skipped rows). An existing output is replaced only with `overwrite`."""
    bad = sorted(set(kinds) - set(KINDS))
    if bad or not kinds:
        raise DataError(f"embed: what to embed must be image, text or both; got {', '.join(kinds) or 'nothing'}.")
    output = Path(output or default_output(model_dir, manifest))
    if output.exists() and not overwrite:
        raise PathExistsError(f"{output} exists; choose another --output or pass --overwrite.")
    model = load_retrieval_model(model_dir, base=base, trust_pickle_weights=trust_pickle_weights)
    data_cfg = model.config.data
    data_cfg.batch_size = batch_size or data_cfg.eval_batch_size or data_cfg.batch_size
    data_cfg.num_workers = num_workers
    split = read_split(manifest, image_column=data_cfg.image_column, text_column=data_cfg.text_column,
                       label_column=data_cfg.label_column, require_labels=False, check_images=data_cfg.check_images,
                       skip_bad_rows=skip_bad_rows, allow_outside_root=data_cfg.allow_outside_root,
                       require_text="text" in kinds)
    loader, truncated = make_loader(split, None, model.source, data_cfg, train=False)
    found: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
    index = []
    for batch in loader:
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        for kind, vectors in _embed_batch(model, batch, kinds).items():
            found[kind].append(vectors.cpu())
        index.append(batch["index"].cpu())
    order = torch.cat(index).argsort()
    tensors = {kind: torch.cat(parts)[order].contiguous() for kind, parts in found.items()}
    examples = split.examples
    tensors["row"] = torch.tensor([ex.row for ex in examples], dtype=torch.long)
    metadata = {"format": FORMAT, "model": str(Path(model_dir).resolve()), "fingerprint": model.source.fingerprint,
                "backbone": model.source.name, "manifest": str(Path(manifest).resolve()),
                "images": json.dumps([ex.image for ex in examples]),
                "texts": json.dumps([ex.text for ex in examples]),
                "skipped_rows": json.dumps([{"row": r, "reason": why} for r, why in split.skipped])}
    _write_atomically(tensors, metadata, output)
    return {"output": str(output), "rows": len(examples), "kinds": list(kinds),
            "dim": next(iter(tensors.values())).shape[1], "truncated_texts": truncated,
            "skipped_rows": [r for r, _ in split.skipped]}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _embed_batch(model: RetrievalModel, batch: dict, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """L2-normalised float32 embeddings, as `RetrievalModel.embed` gives them, of the towers asked for."""
    out = {}
    if "image" in kinds:
        out["image"] = F.normalize(model.encode_image(batch["pixel_values"]).pooled.float(), dim=-1)
    if "text" in kinds:
        out["text"] = F.normalize(model.encode_text(batch["input_ids"], batch["attention_mask"]).pooled.float(),
                                  dim=-1)
    return out


def _write_atomically(tensors: dict, metadata: dict, output: Path) -> None:
    """Written beside the destination and renamed over it: an interrupted run leaves the old file whole."""
    from safetensors.torch import save_file

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)


def read_embeddings(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of an embeddings file (or of the only one in a folder)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("embeddings-*.safetensors"))
        if len(found) != 1:
            raise MissingPathError(f"{path}: expected one embeddings-*.safetensors file (written by `mmpeft embed`), "
                                   f"found {len(found)}{': ' + ', '.join(p.name for p in found) if found else ''}; "
                                   "name the file.")
        path = found[0]
    if not path.is_file():
        raise MissingPathError(f"{path}: no such embeddings file; write one with `mmpeft embed MODEL_DIR MANIFEST`.")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise DataError(f"{path} is not an embeddings file written by `mmpeft embed` (format "
                            f"{metadata.get('format')!r}, expected {FORMAT!r}).")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    metadata = dict(metadata, path=str(path), images=json.loads(metadata["images"]),
                    texts=json.loads(metadata["texts"]))
    return tensors, metadata


@torch.no_grad()
def search(embeddings: str | Path, *, text: str | None = None, image: str | Path | None = None, k: int = 5,
           model_dir: str | Path | None = None, trust_pickle_weights: bool = False) -> list[dict]:
    """Top-k rows of an embeddings file for one query: a caption against its images, or an image against its
    captions. The query is embedded by the model the file was written with (or `model_dir`, which must have the
    same weights fingerprint: embeddings of different models are not comparable)."""
    if (text is None) == (image is None):
        raise DataError("search: give exactly one query, a text (--text) or an image (--image).")
    if k < 1:
        raise DataError(f"search: k must be at least 1, got {k}.")
    tensors, meta = read_embeddings(embeddings)
    against = "image" if text is not None else "text"
    if against not in tensors:
        raise DataError(f"{meta['path']} holds no {against} embeddings; embed the manifest with --what both "
                        f"(or {against}) to search them.")
    model = load_retrieval_model(model_dir or meta["model"], trust_pickle_weights=trust_pickle_weights)
    if model.source.fingerprint != meta["fingerprint"]:
        raise DataError(f"{meta['path']} was embedded by a model with weights fingerprint {meta['fingerprint']}, "
                        f"but {model_dir or meta['model']} has {model.source.fingerprint}: embeddings of different "
                        "models are not comparable; embed the manifest again with this model.")
    query = _embed_text(model, text) if text is not None else _embed_image(model, image)
    scores = tensors[against] @ query.cpu()
    top = scores.topk(min(k, len(scores)))
    hits = []
    for score, i in zip(top.values.tolist(), top.indices.tolist()):
        hit = {"score": round(score, 4), "row": int(tensors["row"][i])}
        hit[against] = meta["images"][i] if against == "image" else meta["texts"][i]
        hits.append(hit)
    return hits


def _embed_text(model: RetrievalModel, text: str) -> torch.Tensor:
    source = model.source
    max_length = model.config.data.max_text_length or source.max_text_length
    ids = encode_texts(source.tokenizer, [text], max_length=max_length).input_ids[0]
    dummy = torch.zeros(1)  # the collator stacks images; a text query has none
    batch = Collator(source.tokenizer.pad_token_id, source.text_padding, max_length)(
        [{"input_ids": ids, "pixel_values": dummy, "labels": -1, "index": 0}])
    device = _device(model)
    return _embed_batch(model, {k: v.to(device) for k, v in batch.items()}, ("text",))["text"][0]


def _embed_image(model: RetrievalModel, path: str | Path) -> torch.Tensor:
    try:
        with Image.open(path) as opened:
            opened.load()
            picture = eight_bit(opened, str(path)).convert("RGB")
    except (OSError, SyntaxError) as err:
        raise DataError(f"Cannot read image {path}: {err}") from None
    pixels = model.source.image_processor(images=picture, return_tensors="pt")["pixel_values"]
    return _embed_batch(model, {"pixel_values": pixels.float().to(_device(model))}, ("image",))["image"][0]


def format_hits(hits: list[dict]) -> str:
    kind = "image" if hits and "image" in hits[0] else "text"
    return "\n".join(f"{n:>3}. {h['score']:.4f}  row {h['row']}  {h[kind]}" for n, h in enumerate(hits, start=1))
