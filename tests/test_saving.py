"""Saving and loading a trained classifier: output folder contents, stock peft round trip, exact reloads,
provenance checks, overwrite protection, best-checkpoint keeping and class weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_manifest
from torch import nn

from mmpeft import (
    BackboneError,
    build_classifier,
    build_dataloaders,
    evaluate,
    get_family,
    load_adapter,
    load_backbone,
    load_config,
    predict_logits,
    save_adapter,
    train,
)
from mmpeft.models.saving import read_manifest
from mmpeft.training.optim import build_optimizer, class_weights

FAST = ["train.mixed_precision=no", "train.progress=false", "train.tracker=null", "data.num_workers=0",
        "data.batch_size=8", "train.warmup_ratio=0", "train.lr_lora=5e-3", "train.lr_head=1e-2",
        "train.lr_full=1e-3", "head.hidden=16"]
METRIC_KEYS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_precision", "weighted_recall",
               "weighted_f1", "loss", "per_class", "confusion_matrix", "num_samples")




def rows16(flip: bool = False) -> list[dict]:
    """The `sixteen_examples` rows; `flip` swaps every label (an eval set that training makes worse)."""
    rows = []
    for i in range(16):
        label = ("cat", "dog")[i % 2]
        color = (220, 40 + 10 * i, 30) if label == "cat" else (30, 40 + 10 * i, 220)
        shown = ("dog", "cat")[i % 2] if flip else label
        rows.append({"text": f"a photo of a {label} number {i}", "label": shown, "color": color})
    return rows


@pytest.fixture(scope="module")
def data16(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("data16"), rows16())


def make_config(path, out, manifest, *extra, eval_manifest=None):
    eval_manifest = eval_manifest or manifest
    return load_config(None, [f"model.name={path}", f"train.output_dir={out}", f"data.train={manifest}",
                              f"data.eval={eval_manifest}", f"data.test={manifest}", *FAST, *extra])


def state_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- short training runs through `train()`

RUNS = {
    "clip": ("clip", []),
    "siglip": ("siglip", []),
    "blip": ("blip", []),
    "clip-full-text": ("clip", ["model.text.mode=full", "model.vision.mode=lora"]),
    "blip-full-text": ("blip", ["model.text.mode=full", "model.vision.mode=frozen"]),
}


def short_run(name, tiny_paths, data16, tmp_path_factory) -> dict:
    family, extra = RUNS[name]
    out = tmp_path_factory.mktemp(f"run-{name}") / "out"
    cfg = make_config(tiny_paths[family], out, data16, "train.max_steps=3", "train.epochs=2", *extra)
    results = train(cfg)
    return {"family": family, "path": tiny_paths[family], "out": out, "cfg": cfg, "results": results}


@pytest.fixture(scope="module", params=sorted(RUNS))
def trained(request, tiny_paths, data16, tmp_path_factory) -> dict:
    return short_run(request.param, tiny_paths, data16, tmp_path_factory)


@pytest.fixture(scope="module")
def clip_run(tiny_paths, data16, tmp_path_factory) -> dict:
    return short_run("clip", tiny_paths, data16, tmp_path_factory)


def test_output_folder_contents(trained):
    out, cfg, results = trained["out"], trained["cfg"], trained["results"]
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "mmpeft.json",
            "metrics.json"} <= names
    assert not [n for n in names if n.startswith(".saving-")], names  # no staging folder left behind

    manifest = read_manifest(out)
    assert manifest["format_version"] == 1
    assert manifest["label_names"] == ["cat", "dog"]
    backbone = manifest["backbone"]
    assert backbone["name"] == str(trained["path"]) and backbone["family"] == trained["family"]
    assert "revision" in backbone
    assert backbone["fingerprint"] == load_backbone(str(trained["path"])).fingerprint
    assert manifest["tower_modes"] == {"text": cfg.model.text.mode, "vision": cfg.model.vision.mode}
    assert manifest["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert {"mmpeft", "torch", "transformers", "peft", "accelerate", "python"} <= set(manifest["versions"])
    assert "git_commit" in manifest

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    full = [m for t in ("text", "vision") if getattr(cfg.model, t).mode == "full"
            for m in get_family(trained["family"]).tower_modules[t]]
    assert sorted(adapter_config.get("modules_to_save") or []) == sorted(full)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(results))
    assert metrics["steps"] == 3 and 1 <= metrics["best_step"] <= 3
    for split in ("eval", "test"):
        split_metrics = metrics[split]
        assert set(METRIC_KEYS) <= set(split_metrics), split
        assert split_metrics["num_samples"] == 16
        assert set(split_metrics["per_class"]) == {"cat", "dog"}
        assert all(set(row) == {"precision", "recall", "f1", "support"} for row in split_metrics["per_class"].values())
        matrix = np.array(split_metrics["confusion_matrix"])
        assert matrix.shape == (2, 2) and matrix.sum() == 16 and list(matrix.sum(1)) == [8, 8]
        assert split_metrics["accuracy"] == np.trace(matrix) / 16


@torch.no_grad()
def test_stock_peft_round_trip(trained):
    """The saved adapter is a plain peft adapter: stock `PeftModel.from_pretrained` gives the same towers."""
    from peft import PeftModel

    family = get_family(trained["family"])
    model_class = family.model_class()
    plain = model_class.from_pretrained(trained["path"], dtype=torch.float32).eval()
    stock = PeftModel.from_pretrained(model_class.from_pretrained(trained["path"], dtype=torch.float32),
                                      trained["out"]).eval()
    ours = load_adapter(trained["out"])
    data = build_dataloaders(trained["cfg"].data, ours.source, splits=("eval",), label_names=ours.label_names)
    batch = next(iter(data.loaders["eval"]))
    inputs = {"text": (batch["input_ids"], batch["attention_mask"]), "vision": (batch["pixel_values"],)}
    encoders = {"text": "encode_text", "vision": "encode_image"}
    for tower, args in inputs.items():
        expected = getattr(ours, encoders[tower])(*args)
        got = getattr(family, encoders[tower])(stock.get_base_model(), *args)
        assert torch.equal(got.pooled, expected.pooled), tower
        assert torch.equal(got.tokens, expected.tokens), tower
        untrained = getattr(family, encoders[tower])(plain, *args).pooled
        assert torch.equal(untrained, expected.pooled) == (ours.tower_modes[tower] == "frozen"), tower


def test_other_backbone_weights_are_refused(clip_run, tiny_clip_other_seed, tmp_path):
    trained = clip_run
    with pytest.raises(BackboneError, match="fingerprint"):
        load_adapter(trained["out"], base=str(tiny_clip_other_seed))
    # The same weights at another location are accepted.
    copy = shutil.copytree(trained["path"], tmp_path / "copy")
    assert load_adapter(trained["out"], base=str(copy)).label_names == ["cat", "dog"]


def test_folder_without_manifest(clip_run, tmp_path):
    trained = clip_run
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors"):
        shutil.copy(trained["out"] / name, partial / name)
    for folder in (partial, tmp_path / "missing"):
        with pytest.raises(FileNotFoundError, match=r"mmpeft\.json is missing"):
            load_adapter(folder)


# ---------------------------------------------------------------- exact reloads of an in-process model

def train_in_process(path, out, manifest, *extra, steps: int = 3):
    """What `train()` does, without Accelerate: build, take a few AdamW steps, save."""
    from accelerate.utils import set_seed

    cfg = make_config(path, out, manifest, *extra)
    set_seed(cfg.train.seed)
    backbone = load_backbone(cfg.model.name, dtype=cfg.model.dtype)
    data = build_dataloaders(cfg.data, backbone, seed=cfg.train.seed)
    model = build_classifier(backbone, cfg, data.label_names)
    optimizer = build_optimizer(model, cfg.train)
    model.train()
    done = 0
    while done < steps:
        for batch in data.loaders["train"]:
            nn.functional.cross_entropy(model(**batch), batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    save_adapter(model, out, cfg, backbone_name=backbone.name, backbone_revision=backbone.revision,
                 fingerprint=backbone.fingerprint)
    return model, data


RELOADS = {
    "clip": ("clip", []),
    "siglip": ("siglip", []),
    "blip": ("blip", []),
    "clip-full-text-frozen-vision": ("clip", ["model.text.mode=full", "model.vision.mode=frozen"]),
    "clip-lora-head": ("clip", ["head.mode=lora"]),
    "siglip-gated-lora-head": ("siglip", ["head.type=gated", "head.mode=lora"]),
    "clip-prompt-static": ("clip", ["head.type=prompt", "model.text.mode=frozen"]),
    "blip-cross-attention": ("blip", ["head.type=cross_attention"]),
}


@pytest.mark.parametrize("name", sorted(RELOADS))
def test_load_adapter_reproduces_logits(name, tiny_paths, data16, tmp_path):
    from accelerate import Accelerator

    family, extra = RELOADS[name]
    model, data = train_in_process(tiny_paths[family], tmp_path / "out", data16, *extra)
    loaded = load_adapter(tmp_path / "out")

    assert loaded.label_names == data.label_names and loaded.tower_modes == model.tower_modes
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(expected) == set(got)
    assert not [k for k in expected if not torch.equal(expected[k], got[k])]
    accelerator = Accelerator(cpu=True)
    logits, labels, index = predict_logits(model, data.loaders["eval"], accelerator)
    logits2, labels2, index2 = predict_logits(loaded, data.loaders["eval"], accelerator)
    assert logits.dtype == torch.float32 and logits.shape == (16, 2)
    assert torch.equal(logits, logits2) and torch.equal(labels, labels2) and torch.equal(index, index2)

    if name == "clip-lora-head":
        trained_lora = [t for n, t in loaded.head.named_parameters() if "lora_B" in n]
        assert trained_lora and all(t.abs().sum() > 0 for t in trained_lora)
        assert all(("lora_" in n) == p.requires_grad for n, p in model.head.named_parameters())
    if name == "clip-prompt-static":
        assert loaded.head.class_embeds is not None  # frozen text tower: static class embeddings, saved
        assert torch.equal(loaded.head.class_embeds, model.head.class_embeds)
        assert loaded.head.class_embeds.abs().sum() > 0


# ---------------------------------------------------------------- overwrite protection

def test_existing_output_dir_is_protected(tiny_paths, data16, tmp_path):
    out = tmp_path / "out"
    base = [tiny_paths["clip"], out, data16, "train.max_steps=1"]
    train(make_config(*base))
    before = state_of(out)
    assert {"mmpeft.json", "adapter_model.safetensors", "metrics.json"} <= set(before)

    with pytest.raises(FileExistsError, match="train.overwrite=true"):
        train(make_config(*base, "train.seed=1"))
    assert state_of(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)

    train(make_config(*base, "train.seed=1", "train.overwrite=true"))
    after = state_of(out)
    assert read_manifest(out)["config"]["train"]["seed"] == 1
    assert after["adapter_model.safetensors"][0] != before["adapter_model.safetensors"][0]
    assert after["metrics.json"][1] != before["metrics.json"][1]

    # A later run without adapter (both towers frozen) must not leave the earlier adapter behind.
    train(make_config(*base, "train.overwrite=true", "model.text.mode=frozen", "model.vision.mode=frozen"))
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    loaded = load_adapter(out)
    assert not hasattr(loaded.backbone, "peft_config")


# ---------------------------------------------------------------- best checkpoint

def test_best_checkpoint_is_kept_and_reloads(tiny_paths, data16, tmp_path):
    # Eval labels are flipped, so learning the training set makes eval worse: the best step is not the last.
    flipped = write_manifest(tmp_path / "flipped", rows16(flip=True), name="eval.jsonl")
    out = tmp_path / "out"
    cfg = make_config(tiny_paths["clip"], out, data16, "train.eval_every=1", "train.epochs=4",
                      "train.metric_for_best=loss", eval_manifest=flipped)
    results = train(cfg)

    history = results["history"]
    assert [h["step"] for h in history] == list(range(1, 9)) and results["steps"] == 8
    losses = [h["loss"] for h in history]
    best = history[losses.index(min(losses))]
    assert results["best_step"] == best["step"] < results["steps"]
    assert json.loads((out / "metrics.json").read_text())["best_step"] == best["step"]
    # The final evaluation is of the best checkpoint ...
    assert results["eval"]["loss"] == best["loss"] and results["eval"]["accuracy"] == best["accuracy"]
    # ... and so is the saved adapter.
    from accelerate import Accelerator

    loaded = load_adapter(out)
    data = build_dataloaders(cfg.data, loaded.source, splits=("eval",), label_names=loaded.label_names)
    reloaded = evaluate(loaded, data.loaders["eval"], Accelerator(cpu=True), loaded.label_names, nn.CrossEntropyLoss())
    assert reloaded["loss"] == best["loss"]
    assert reloaded["macro_f1"] == best["macro_f1"] and reloaded["accuracy"] == best["accuracy"]


# ---------------------------------------------------------------- class weights

def test_balanced_class_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 30 + [1] * 10)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    np.testing.assert_allclose(class_weights([30, 10], "balanced").numpy(), expected, rtol=1e-6)
    y3 = np.array([0] * 7 + [1] * 2 + [2] * 11)
    np.testing.assert_allclose(class_weights([7, 2, 11], "balanced").numpy(),
                               compute_class_weight("balanced", classes=np.arange(3), y=y3), rtol=1e-6)
    assert class_weights([30, 10], "none") is None
    with pytest.raises(ValueError, match="every class"):
        class_weights([30, 0], "balanced")


def test_balanced_class_weights_train(tiny_paths, tmp_path):
    from accelerate import Accelerator
    from sklearn.utils.class_weight import compute_class_weight

    rows = rows16() + [r for r in rows16() if r["label"] == "cat"]  # 16 cat, 8 dog
    manifest = write_manifest(tmp_path / "imbalanced", rows)
    out = tmp_path / "out"
    cfg = make_config(tiny_paths["clip"], out, manifest, "train.class_weights=balanced", "train.max_steps=3")
    results = train(cfg)
    assert results["steps"] == 3 and results["eval"]["num_samples"] == 24

    # The reported eval loss is the class-weighted cross-entropy of the saved model's logits.
    loaded = load_adapter(out)
    data = build_dataloaders(cfg.data, loaded.source, splits=("eval",), label_names=loaded.label_names)
    logits, labels, _ = predict_logits(loaded, data.loaders["eval"], Accelerator(cpu=True))
    weights = compute_class_weight("balanced", classes=np.arange(2), y=labels.numpy())
    np.testing.assert_allclose(weights, [0.75, 1.5])
    weighted = nn.functional.cross_entropy(logits.double(), labels, weight=torch.tensor(weights))
    unweighted = nn.functional.cross_entropy(logits.double(), labels)
    assert results["eval"]["loss"] == pytest.approx(float(weighted), rel=1e-5)
    assert results["eval"]["loss"] != pytest.approx(float(unweighted), rel=1e-5)
