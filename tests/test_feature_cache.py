"""The frozen-tower feature cache (mmpeft/models/feature_cache.py): cached results equal uncached ones, in memory
and memory-mapped in a fresh cache object, with images no longer decoded; the key sees every weight; the cache
says why it is off."""

from __future__ import annotations

import pytest
import torch

from mmpeft import build_classifier, build_dataloaders, load_backbone, load_config
from mmpeft.models.feature_cache import FeatureCache, cache_blockers, cache_key, tower_modules, tower_weights_sha256


def _setup(tiny_paths, manifest, *overrides):
    cfg = load_config(None, [f"model.name={tiny_paths['clip']}", f"data.train={manifest}", "data.batch_size=4",
                             "data.num_workers=0", "model.vision.mode=frozen", "model.text.lora.dropout=0.0",
                             "head.dropout=0.0", *overrides])
    backbone = load_backbone(cfg.model.name)
    data = build_dataloaders(cfg.data, backbone, splits=("train",))
    torch.manual_seed(0)
    model = build_classifier(backbone, cfg, data.label_names).eval()
    return cfg, backbone, data.loaders["train"], model


def _key(model, loader, backbone, **kw):
    return cache_key(model, "vision", loader.dataset, mixed_precision="no", device="cpu",
                     image_processor=backbone.image_processor, **kw)


def _logits(model, loader):
    with torch.no_grad():
        return torch.cat([model(**batch) for batch in loader])


def test_cached_vision_features_give_the_uncached_logits(tiny_paths, sixteen_examples, tmp_path):
    cfg, backbone, loader, model = _setup(tiny_paths, sixteen_examples)
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=4, shuffle=False, collate_fn=loader.collate_fn)
    assert cache_blockers(model.train(), "vision") == []
    model.eval()
    uncached = _logits(model, loader)
    key = _key(model, loader, backbone)
    cache = FeatureCache(key, len(loader.dataset), root=tmp_path / "features")
    model.feature_caches = {"vision": cache}
    first = _logits(model, loader)  # fills the cache
    assert cache.complete and (tmp_path / "features" / key / "complete.json").is_file()
    loader.dataset.load_images = False  # later epochs: no image is decoded at all
    batch = next(iter(loader))
    assert "pixel_values" not in batch
    second = _logits(model, loader)
    torch.testing.assert_close(first, uncached, rtol=0, atol=0)
    torch.testing.assert_close(second, uncached, rtol=0, atol=0)
    # A fresh process finds the cache on disk, memory-mapped, and computes nothing.
    model.feature_caches = {"vision": FeatureCache(key, len(loader.dataset), root=tmp_path / "features")}
    assert model.feature_caches["vision"].complete
    torch.testing.assert_close(_logits(model, loader), uncached, rtol=0, atol=0)


def test_cache_key_sees_every_weight_dtype_and_input(tiny_paths, sixteen_examples):
    cfg, backbone, loader, model = _setup(tiny_paths, sixteen_examples)
    key = _key(model, loader, backbone)
    weights = tower_weights_sha256(tower_modules(model, "vision"))
    assert len(weights) == 64 and len(key) == 64
    assert _key(model, loader, backbone) == key  # deterministic
    assert cache_key(model, "vision", loader.dataset, mixed_precision="bf16", device="cpu",
                     image_processor=backbone.image_processor) != key
    layer = model.base.vision_model.encoder.layers[0].mlp.fc1
    with torch.no_grad():
        layer.weight[3, 5] += 1e-3  # one value: a sampled fingerprint may miss it, the full hash does not
    assert tower_weights_sha256(tower_modules(model, "vision")) != weights
    with torch.no_grad():
        layer.weight[3, 5] -= 1e-3
    model.base.vision_model.to(torch.bfloat16)
    assert _key(model, loader, backbone) != key
    model.base.vision_model.to(torch.float32)
    image = loader.dataset.examples[0].image
    with open(image, "ab") as f:
        f.write(b"\0")
    assert _key(model, loader, backbone) != key


def test_cache_says_why_it_is_off(tiny_paths, sixteen_examples):
    _, _, _, model = _setup(tiny_paths, sixteen_examples)
    model.train()
    assert any("trains (mode lora)" in r for r in cache_blockers(model, "text"))
    assert any("LoRA layers" in r for r in cache_blockers(model, "text"))
    assert any("augmentation" in r for r in cache_blockers(model, "vision", augment=True))
    assert any("token states" in r for r in cache_blockers(model, "vision", head_reads_tokens=True))
    assert any("several processes" in r for r in cache_blockers(model, "vision", num_processes=2))
    dropout = torch.nn.Dropout(0.1)
    model.base.vision_model.add_module("extra_dropout", dropout)  # a frozen tower held in train mode
    dropout.train()
    assert any("dropout" in r for r in cache_blockers(model, "vision"))


# --- the cache in the training loop (mmpeft/training/caching.py) ----------------------------------------------------

def _run(tiny_paths, data, out, *extra):
    from mmpeft import train

    return train(load_config(None, [f"model.name={tiny_paths['clip']}", f"train.output_dir={out}", f"data.train={data}",
                                    f"data.eval={data}", "train.progress=false", "train.tracker=null",
                                    "train.mixed_precision=no", "data.num_workers=0", "data.batch_size=4",
                                    "head.hidden=8", "model.vision.mode=frozen", "train.epochs=3", *extra]))


def test_a_run_with_the_cache_trains_as_one_without_it(tiny_paths, sixteen_examples, tmp_path, monkeypatch):
    """Frozen vision tower, LoRA text tower: every epoch after the first reads the vision features from the cache
    (in memory, or from disk in a later run) and decodes no image; the loss history and the final metrics are the
    uncached run's."""
    from mmpeft.data.dataset import MultimodalDataset

    decoded = []
    load_image = MultimodalDataset.load_image
    monkeypatch.setattr(MultimodalDataset, "load_image", lambda self, i: decoded.append(i) or load_image(self, i))
    off = _run(tiny_paths, sixteen_examples, tmp_path / "off", "train.feature_cache=off")
    decoded_off, decoded[:] = len(decoded), []
    memory = _run(tiny_paths, sixteen_examples, tmp_path / "memory")  # the default
    # 3 epochs of 16 and 4 evaluations of 16 without the cache; with it, the first pass over each split only
    assert (decoded_off, len(decoded)) == (3 * 16 + 4 * 16, 16 + 16)
    disk = [_run(tiny_paths, sixteen_examples, tmp_path / f"disk{i}", "train.feature_cache=disk",
                 f"train.feature_cache_dir={tmp_path / 'cache'}") for i in range(2)]
    assert off["feature_cache"]["vision"] == "not cached (train.feature_cache=off)"
    assert memory["feature_cache"]["vision"] == "cached in memory (train, eval)"
    assert memory["feature_cache"]["text"].startswith("not cached: the text tower trains (mode lora)")
    assert disk[0]["feature_cache"]["vision"].startswith("cached on disk under")
    written = sorted((tmp_path / "cache" / "features").iterdir())
    # train and eval are the same manifest here: the same inputs, one key, one cache for both
    assert len(written) == 1 and (written[0] / "complete.json").is_file()
    for run in (memory, *disk):
        assert [h["loss"] for h in run["history"]] == pytest.approx([h["loss"] for h in off["history"]], abs=1e-5)
        assert run["eval"]["macro_f1"] == off["eval"]["macro_f1"]
        assert run["eval"]["loss"] == pytest.approx(off["eval"]["loss"], abs=1e-5)


def test_the_cache_stays_off_where_the_tower_can_change_and_says_why(tiny_paths, sixteen_examples, tmp_path):
    augmented = _run(tiny_paths, sixteen_examples, tmp_path / "aug", "data.augment.enabled=true", "train.max_steps=1")
    assert augmented["feature_cache"]["vision"] == ("cached in memory (eval); not for train: image augmentation "
                                                    "changes the vision inputs every epoch")
    tokens = _run(tiny_paths, sixteen_examples, tmp_path / "xattn", "head.type=cross_attention", "train.max_steps=1")
    assert tokens["feature_cache"]["vision"] == ("not cached: the head reads token states, and only pooled outputs "
                                                 "are cached")
