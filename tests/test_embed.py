"""`mmpeft embed` / `mmpeft search`: a retrieval model's embeddings of a manifest in a safetensors file (row order,
paths and captions recorded), and top-k images for a caption or captions for an image, scored as the model scores."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mmpeft import load_config, load_retrieval_model, save_adapter
from mmpeft.backbones import load_backbone
from mmpeft.cli import main
from mmpeft.export.embed import read_embeddings, search
from mmpeft.models.retrieval import build_retrieval_model
from mmpeft.testing import perturb_lora
from mmpeft.world.retrieval import write_retrieval


def _saved_retrieval(path, out):
    """A retrieval model with non-zero LoRA updates, saved the way training saves it."""
    cfg = load_config(None, [f"model.name={path}", "task=retrieval", "model.text.lora.dropout=0.0",
                             "model.vision.lora.dropout=0.0"])
    backbone = load_backbone(cfg.model.name)
    model = build_retrieval_model(backbone, cfg)
    perturb_lora(model)
    save_adapter(model, out, cfg, backbone_name=cfg.model.name, backbone_revision=None,
                 fingerprint=backbone.fingerprint)
    return out


@pytest.fixture(scope="module")
def embedded(tiny_paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    data = write_retrieval(root / "world", sizes={"train": 3, "val": 3, "test": 6})["test"]
    run = _saved_retrieval(tiny_paths["clip"], root / "run")
    assert main(["embed", str(run), str(data), "--num-workers", "0", "--batch-size", "4"]) == 0
    return run, data, run / "embeddings-test.safetensors"


def test_embed_writes_the_models_embeddings_in_manifest_order(embedded, capsys):
    run, data, path = embedded
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tensors, meta = read_embeddings(path)
    assert tensors["image"].shape == tensors["text"].shape and tensors["image"].shape[0] == 6
    assert tensors["row"].tolist() == [1, 2, 3, 4, 5, 6]
    assert meta["texts"] == [r["text"] for r in rows]
    assert meta["images"] == [str(data.parent / r["image"]) for r in rows]
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["manifest"] == str(data.resolve())
    # the same vectors as the model's own embedding of one batch holding every row (evaluation's path)
    from mmpeft.data.loaders import make_loader
    from mmpeft.data.manifest import read_split

    model = load_retrieval_model(run)
    model.config.data.batch_size = 6
    batch = next(iter(make_loader(read_split(data, require_labels=False), None, model.source, model.config.data,
                                  train=False)[0]))
    with torch.no_grad():
        image, text = model(**batch, embed=True)
    torch.testing.assert_close(tensors["image"], image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tensors["text"], text, atol=1e-5, rtol=1e-5)
    # nothing is overwritten unasked
    assert main(["embed", str(run), str(data), "--num-workers", "0"]) == 2
    assert "exists; choose another --output or pass --overwrite" in capsys.readouterr().err


def test_search_ranks_by_the_stored_similarities(embedded, capsys):
    run, _, path = embedded
    tensors, meta = read_embeddings(path)
    expected = (tensors["image"] @ tensors["text"][2]).topk(3)
    hits = search(path, text=meta["texts"][2], k=3)
    assert [h["image"] for h in hits] == [meta["images"][i] for i in expected.indices.tolist()]
    assert [h["score"] for h in hits] == pytest.approx(expected.values.tolist(), abs=1e-4)
    by_image = search(run, image=meta["images"][4], k=2)  # the folder holding one embeddings file
    expected = (tensors["text"] @ tensors["image"][4]).topk(2)
    assert [h["text"] for h in by_image] == [meta["texts"][i] for i in expected.indices.tolist()]
    assert by_image[0]["row"] == int(tensors["row"][expected.indices[0]])

    assert main(["search", str(path), "--text", meta["texts"][0], "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("  1. ") and "row " in lines[0]


def test_search_refusals(embedded, tiny_clip_other_seed, tmp_path, capsys):
    run, data, path = embedded
    text_only = tmp_path / "texts.safetensors"
    assert main(["embed", str(run), str(data), "--what", "text", "--output", str(text_only),
                 "--num-workers", "0"]) == 0
    assert main(["search", str(text_only), "--text", "a red circle"]) == 2
    assert "holds no image embeddings; embed the manifest with --what both" in capsys.readouterr().err
    other = _saved_retrieval(tiny_clip_other_seed, tmp_path / "other")
    assert main(["search", str(path), "--text", "a red circle", "--model", str(other)]) == 2
    assert "embeddings of different models are not comparable" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nothing.safetensors"), "--text", "x"]) == 2
    assert "no such embeddings file" in capsys.readouterr().err
