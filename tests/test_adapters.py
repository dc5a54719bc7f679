"""Per-tower adapters, heads and head modes: exactly the intended modules train, and every one of them learns."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from peft.tuners.lora import LoraLayer
from torch import nn

from mmpeft.models.adapters import (build_lora_config, format_trainable, lora_module_names, tower_targets,
                                   trainable_report)
from mmpeft.backbones import get_family, load_backbone
from mmpeft.config import HEAD_TYPES, load_config
from mmpeft.data import Collator, encode_texts
from mmpeft.models.classifier import build_classifier

FAMILIES = ("clip", "siglip", "blip")
LABELS = ["negative", "positive"]
TEXTS = ["a happy dog", "a sad cat sitting in the rain on a cold grey day"]
TOWER_COMBOS = [
    ("frozen", "frozen"),
    ("lora", "lora"),
    ("full", "full"),
    ("lora", "full"),
    ("frozen", "lora"),
]
# Parameters outside both towers: no tower mode may ever train them.
NON_TOWER = {"clip": {"logit_scale"}, "siglip": {"logit_scale", "logit_bias"},
             "blip": {"itm_head.weight", "itm_head.bias"}}


# --- helpers --------------------------------------------------------------------------------------------------


def _config(text="lora", vision="lora", head="concat", head_mode="full", *extra):
    return load_config(None, [f"model.text.mode={text}", f"model.vision.mode={vision}", f"head.type={head}",
                              f"head.mode={head_mode}", "model.text.lora.dropout=0.0",
                              "model.vision.lora.dropout=0.0", *extra])


def _classifier(path, cfg, labels=LABELS):
    """A fresh backbone per classifier: peft injects its layers into the loaded model."""
    backbone = load_backbone(str(path))
    return backbone, build_classifier(backbone, cfg, labels)


def _batch(backbone, texts=TEXTS):
    """Two examples: pixels from the image processor, tokens encoded and padded the family's way."""
    max_length = backbone.max_text_length
    encoded = encode_texts(backbone.tokenizer, texts, max_length=max_length)
    images = [Image.new("RGB", (48, 40), (40 + 150 * i, 120, 200 - 90 * i)) for i in range(len(texts))]
    pixels = backbone.image_processor(images=images, return_tensors="pt")["pixel_values"]
    items = [{"input_ids": ids, "pixel_values": pixels[i], "labels": i % 2, "index": i}
             for i, ids in enumerate(encoded.input_ids)]
    return Collator(backbone.tokenizer.pad_token_id, backbone.text_padding, max_length)(items)


def _plain(name: str) -> str:
    """A classifier parameter's name relative to the unwrapped transformers model (or `head.`...)."""
    return (name.removeprefix("backbone.").removeprefix("base_model.model.")
            .replace(".modules_to_save.default", ""))


def _randomize_lora_b(model: nn.Module) -> None:
    """LoRA's B starts at zero, which would leave every A without gradient."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen) + 0.01)


def _train_step(model: nn.Module, batch: dict) -> torch.Tensor:
    torch.manual_seed(0)
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(**batch)
    F.cross_entropy(logits, batch["labels"]).backward()
    return logits


def _assert_grads(model: nn.Module) -> None:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing trains"
    no_grad = [n for n, p in trainable if p.grad is None]
    zero_grad = [n for n, p in trainable if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not no_grad, f"trainable parameters without a gradient: {no_grad}"
    assert not zero_grad, f"trainable parameters with an all-zero gradient: {zero_grad}"
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad, frozen_with_grad


def _num_layers(config, tower: str) -> int:
    return getattr(config, f"{tower}_config").num_hidden_layers


def _expected_lora(family: str, config, tower: str, last: int | None = None) -> set[str]:
    """The modules that must carry LoRA, written out by hand per family."""
    n = _num_layers(config, tower)
    layers = range(n) if last is None else range(n - last, n)
    if family in ("clip", "siglip"):
        prefix = "text_model" if tower == "text" else "vision_model"
        return {f"{prefix}.encoder.layers.{i}.self_attn.{p}_proj" for i in layers for p in ("q", "k", "v", "out")}
    if tower == "text":
        return {f"text_encoder.encoder.layer.{i}.attention.{m}" for i in layers
                for m in ("self.query", "self.key", "self.value", "output.dense")}
    return {f"vision_model.encoder.layers.{i}.self_attn.{m}" for i in layers for m in ("qkv", "projection")}


def _tower_params(family: str, path, tower: str) -> set[str]:
    """Every parameter of one tower in a freshly loaded model, minus those classification never uses."""
    spec = get_family(family)
    model = load_backbone(str(path)).model
    names = {n for n, _ in model.named_parameters() if spec.tower_of(n) == tower}
    if spec.unused_in_full:
        names = {n for n in names if not re.fullmatch(spec.unused_in_full, n)}
    return names


# --- tower modes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text_mode,vision_mode", TOWER_COMBOS, ids=lambda m: m)
@pytest.mark.parametrize("family", FAMILIES)
def test_tower_modes_train_exactly_the_intended_parameters(tiny_paths, family, text_mode, vision_mode):
    backbone, model = _classifier(tiny_paths[family], _config(text_mode, vision_mode))
    config = backbone.model.config
    modes = {"text": text_mode, "vision": vision_mode}

    expected_lora = set()
    expected_trainable = {f"head.{n}" for n, _ in model.head.named_parameters()}
    for tower, mode in modes.items():
        if mode == "lora":
            modules = _expected_lora(family, config, tower)
            expected_lora |= modules
            expected_trainable |= {f"{m}.lora_{ab}.default.weight" for m in modules for ab in "AB"}
        elif mode == "full":
            expected_trainable |= _tower_params(family, tiny_paths[family], tower)

    lora = set(lora_module_names(model.backbone))
    assert lora == expected_lora
    assert not any("crossattention" in n for n in lora)
    assert not any(n.startswith("vision_model.head") for n in lora)
    trainable = {_plain(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable

    base = dict(model.base.named_parameters())
    for name in NON_TOWER[family]:
        assert not base[name].requires_grad, name
    if family == "blip":
        cross = [n for n, p in model.named_parameters() if "crossattention" in n]
        assert cross and not any(p.requires_grad for n, p in model.named_parameters() if "crossattention" in n)

    _randomize_lora_b(model)
    logits = _train_step(model, _batch(backbone))
    assert logits.shape == (2, len(LABELS))
    _assert_grads(model)


def test_full_tower_is_a_trainable_copy(tiny_paths):
    """peft's modules_to_save: the trained copy is used in forward, the original stays frozen and untouched."""
    backbone, model = _classifier(tiny_paths["clip"], _config("full", "frozen"))
    names = dict(model.named_parameters())
    copies = [n for n in names if ".modules_to_save.default." in n]
    originals = [n for n in names if ".original_module." in n]
    assert copies and originals
    assert all(names[n].requires_grad for n in copies)
    assert not any(names[n].requires_grad for n in originals)
    assert not any(p.requires_grad for n, p in names.items() if "vision_model" in n or "visual_projection" in n)


# --- heads ----------------------------------------------------------------------------------------------------


def _head_towers(head: str, mode: str = "lora") -> tuple[str, str]:
    """The tower modes for a head: `mode` on the towers it reads, frozen on the one it never runs."""
    return {"text_only": (mode, "frozen"), "image_only": ("frozen", mode)}.get(head, (mode, mode))


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
@pytest.mark.parametrize("head", HEAD_TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_head_on_every_family(tiny_paths, family, head, mode):
    text_mode, vision_mode = _head_towers(head, mode)
    labels = ["cat", "dog", "bird"]
    backbone, model = _classifier(tiny_paths[family], _config(text_mode, vision_mode, head), labels)
    assert any(p.requires_grad for p in model.head.parameters())
    _randomize_lora_b(model)
    batch = _batch(backbone)
    batch["labels"] = torch.tensor([0, 2])
    logits = _train_step(model, batch)
    assert logits.shape == (2, len(labels))
    assert torch.isfinite(logits).all()
    _assert_grads(model)


@pytest.mark.parametrize("head,unused", [("text_only", "vision"), ("image_only", "text")])
def test_unimodal_head_needs_unused_tower_frozen(head, unused):
    used = "vision" if unused == "text" else "text"
    for mode in ("lora", "full"):
        with pytest.raises(ValueError) as err:
            load_config(None, [f"head.type={head}", f"model.{unused}.mode={mode}", f"model.{used}.mode=lora"])
        message = str(err.value)
        assert f"`head.type={head}` never runs the {unused} tower" in message
        assert f"set `model.{unused}.mode=frozen` (it is `{mode}`)" in message
    load_config(None, [f"head.type={head}", f"model.{unused}.mode=frozen"])  # accepted


@pytest.mark.parametrize("head", HEAD_TYPES)
def test_frozen_head_trains_nothing_in_the_head(tiny_paths, head):
    backbone, model = _classifier(tiny_paths["clip"], _config(*_head_towers(head), head, "frozen"))
    assert not any(p.requires_grad for p in model.head.parameters())
    _randomize_lora_b(model)
    _train_step(model, _batch(backbone))
    _assert_grads(model)  # the tower adapters still learn
    assert all(p.grad is None for p in model.head.parameters())


@pytest.mark.parametrize("head", [h for h in HEAD_TYPES if h != "prompt"])
@pytest.mark.parametrize("family", ["clip", "blip"])
def test_lora_head_trains_only_its_adapters(tiny_paths, family, head):
    backbone, model = _classifier(tiny_paths[family], _config(*_head_towers(head), head, "lora"))
    head_trainable = [n for n, p in model.head.named_parameters() if p.requires_grad]
    assert head_trainable and all("lora_" in n for n in head_trainable)
    # Every nn.Linear of the head got an adapter: the only plain Linears left are LoRA's own and wrapped bases.
    bare = [n for n, m in model.head.named_modules() if type(m) is nn.Linear
            and ".lora_" not in n and not n.endswith("base_layer")]
    assert not bare
    assert sum(isinstance(m, LoraLayer) for m in model.head.modules()) >= 2
    _randomize_lora_b(model)
    _train_step(model, _batch(backbone))
    _assert_grads(model)
    assert all(p.grad is None for n, p in model.head.named_parameters() if "lora_" not in n)


def test_prompt_head_rejects_lora_mode():
    with pytest.raises(ValueError, match="`head.type=prompt` has no linear layers for LoRA"):
        load_config(None, ["head.type=prompt", "head.mode=lora"])


def test_prompt_head_starts_as_zero_shot_clip(tiny_paths):
    labels = ["cat", "dog", "bird", "red car"]
    cfg = _config("frozen", "frozen", "prompt", "full", "head.prompt_template=a picture of a {}.")
    backbone, model = _classifier(tiny_paths["clip"], cfg, labels)
    assert model.head.class_embeds is not None and model.head.class_embeds.requires_grad
    batch = _batch(backbone)
    model.eval()
    with torch.no_grad():
        logits = model(**batch)

        clip = load_backbone(str(tiny_paths["clip"])).model
        prompts = backbone.tokenizer([f"a picture of a {c}." for c in labels], padding=True, return_tensors="pt")
        text = clip.get_text_features(**prompts)
        image = clip.get_image_features(pixel_values=batch["pixel_values"])
        text = getattr(text, "pooler_output", text)
        image = getattr(image, "pooler_output", image)
        expected = clip.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    assert logits.shape == (2, len(labels))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_prompt_head_with_lora_text_reencodes_classes(tiny_paths):
    backbone, model = _classifier(tiny_paths["clip"], _config("lora", "frozen", "prompt"), ["cat", "dog", "bird"])
    assert model.head.class_embeds is None
    assert [n for n, _ in model.head.named_parameters()] == ["logit_scale"]
    batch = _batch(backbone)
    model.eval()
    with torch.no_grad():
        before = model(**batch)
        # The batch's captions play no part: the class prompts are what the text tower encodes.
        other = dict(batch, input_ids=torch.flip(batch["input_ids"], [0]))
        torch.testing.assert_close(model(**other), before)
        for name, param in model.named_parameters():
            if "lora_B" in name and name.count("text_model"):
                param.normal_()
        after = model(**batch)
    assert not torch.allclose(before, after)


# --- LoRA settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_layers_restricts_to_the_last_layers(tiny_paths, family):
    backbone, model = _classifier(tiny_paths[family], _config("lora", "lora", "concat", "full",
                                                              "model.text.lora.layers=1"))
    config = backbone.model.config
    assert _num_layers(config, "text") == 2
    expected = _expected_lora(family, config, "text", last=1) | _expected_lora(family, config, "vision")
    assert set(lora_module_names(model.backbone)) == expected


def test_lora_layers_out_of_range_raises(tiny_paths):
    backbone = load_backbone(str(tiny_paths["clip"]))
    with pytest.raises(ValueError, match=r"`model.text.lora.layers=5` but the text tower has 2 layers"):
        build_lora_config(backbone, _config("lora", "lora", "concat", "full", "model.text.lora.layers=5").model)
    settings = _config("lora", "lora", "concat", "full", "model.text.lora.layers=1",
                       "model.text.lora.targets=text_model.encoder.layers.0.mlp.fc1").model.text.lora
    with pytest.raises(ValueError, match=r"needs `\{layer\}` in the target regex"):
        tower_targets(backbone.family, "text", settings, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_and_alpha_per_tower(tiny_paths, family):
    cfg = _config("lora", "lora", "concat", "full", "model.text.lora.r=8", "model.text.lora.alpha=16",
                  "model.vision.lora.r=4", "model.vision.lora.alpha=2")
    backbone, model = _classifier(tiny_paths[family], cfg)
    spec = get_family(family)
    modules = dict(model.backbone.named_modules())
    names = lora_module_names(model.backbone)
    assert {spec.tower_of(n) for n in names} == {"text", "vision"}
    for name in names:
        layer = modules[f"base_model.model.{name}"]
        rank, alpha = (8, 16) if spec.tower_of(name) == "text" else (4, 2)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.shape == (rank, layer.base_layer.in_features), name
        assert b.shape == (layer.base_layer.out_features, rank), name
        assert layer.scaling["default"] == pytest.approx(alpha / rank), name


def test_dora_passes_through(tiny_paths):
    cfg = _config("lora", "lora", "concat", "full", "model.text.lora.use_dora=true", "model.vision.lora.use_dora=true")
    backbone, model = _classifier(tiny_paths["clip"], cfg)
    modules = dict(model.backbone.named_modules())
    names = lora_module_names(model.backbone)
    assert names
    for name in names:
        assert "default" in modules[f"base_model.model.{name}"].lora_magnitude_vector, name
    _randomize_lora_b(model)
    _train_step(model, _batch(backbone))
    _assert_grads(model)


def test_towers_must_agree_on_shared_settings(tiny_paths):
    backbone = load_backbone(str(tiny_paths["clip"]))
    cfg = load_config(None, ["model.text.lora.dropout=0.1", "model.vision.lora.dropout=0.2"])
    with pytest.raises(ValueError) as err:
        build_lora_config(backbone, cfg.model)
    assert "model.text.lora.dropout=0.1" in str(err.value)
    assert "model.vision.lora.dropout=0.2" in str(err.value)
    cfg = load_config(None, ["model.text.lora.use_dora=true"])
    with pytest.raises(ValueError, match="model.text.lora.use_dora=True.*model.vision.lora.use_dora=False"):
        build_lora_config(backbone, cfg.model)
    # A full (or frozen) tower has no LoRA settings to disagree with.
    cfg = load_config(None, ["model.text.lora.dropout=0.1", "model.vision.lora.dropout=0.2", "model.vision.mode=full"])
    assert build_lora_config(backbone, cfg.model).lora_dropout == 0.1


def test_targets_matching_nothing_raise(tiny_paths):
    cfg = _config("lora", "lora", "concat", "full", "model.text.lora.targets=no_such_module")
    with pytest.raises(ValueError, match=r"`model.text.mode=lora` but no module .* matches the text target regex; "
                                         r"check `model.text.lora.targets`"):
        _classifier(tiny_paths["clip"], cfg)
    cfg = _config("lora", "frozen", "concat", "full", "model.text.lora.targets=no_such_module")
    with pytest.raises(ValueError, match="peft could not attach the adapter"):
        _classifier(tiny_paths["clip"], cfg)


def test_custom_targets_are_used(tiny_paths):
    targets = r"text_model\.encoder\.layers\.{layer}\.mlp\.fc(1|2)"
    cfg = _config("lora", "frozen", "concat", "full", f"model.text.lora.targets={targets}")
    backbone, model = _classifier(tiny_paths["clip"], cfg)
    assert set(lora_module_names(model.backbone)) == {
        f"text_model.encoder.layers.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)}


# --- reporting and modes --------------------------------------------------------------------------------------


def test_trainable_report_counts_by_hand(tiny_paths):
    r = 8
    backbone, model = _classifier(tiny_paths["clip"], _config("lora", "lora", "concat", "full",
                                                              f"model.text.lora.r={r}", f"model.vision.lora.r={r}"))
    fresh = load_backbone(str(tiny_paths["clip"])).model
    spec = get_family("clip")
    base = {"text": 0, "vision": 0, "other": 0}
    for name, param in fresh.named_parameters():
        base[spec.tower_of(name) or "other"] += param.numel()
    adapters = {}
    for tower in ("text", "vision"):
        hidden = getattr(fresh.config, f"{tower}_config").hidden_size
        # q, k, v, out: each a Linear(hidden, hidden) with A (r x in) and B (out x r).
        adapters[tower] = _num_layers(fresh.config, tower) * 4 * r * (hidden + hidden)
    head = sum(p.numel() for p in model.head.parameters())

    report = trainable_report(model)  # the model knows its family
    assert report == trainable_report(model, spec)
    for tower in ("text", "vision"):
        total = base[tower] + adapters[tower]
        assert report[tower] == {"trainable": adapters[tower], "total": total,
                                 "percent": round(100 * adapters[tower] / total, 3)}
    assert report["head"] == {"trainable": head, "total": head, "percent": 100.0}
    assert base["other"] == 1 and "other" not in report  # CLIP's frozen logit_scale: no "other 0/1" line
    line = format_trainable(report)
    total = base["text"] + base["vision"] + sum(adapters.values()) + head
    assert line.startswith(f"trainable parameters: text {adapters['text']:,} / ")
    assert f"head {head:,} / " in line and "(100.00%)" in line
    trained = sum(adapters.values()) + head
    assert 1e3 < total < 1e6 and line.endswith(f"all {trained:,} / {total / 1e3:.3g}k ({100 * trained / total:.2f}%)")


def test_trainable_report_counts_4bit_weights_not_packed_bytes(tiny_paths):
    pytest.importorskip("bitsandbytes")
    plain = trainable_report(_classifier(tiny_paths["clip"], _config("lora", "lora"))[1])
    cfg = _config("lora", "lora", "concat", "full", "model.quantization={bits: 4}")
    backbone = load_backbone(str(tiny_paths["clip"]), quantization=cfg.model.quantization)
    quantized = trainable_report(build_classifier(backbone, cfg, LABELS))
    assert quantized == plain  # a Params4bit of shape (n/2, 1) holds n weights


def test_lora_module_names_are_relative_to_the_backbone_from_any_wrapper(tiny_paths):
    backbone, model = _classifier(tiny_paths["clip"], _config("lora", "frozen"))
    names = lora_module_names(model.backbone)
    assert names == lora_module_names(model)  # the classifier: same names, no `backbone.base_model.model.`
    assert names[0].startswith("text_model.encoder.layers.0.") and all(
        isinstance(backbone.model.get_submodule(n), LoraLayer) for n in names)


def test_frozen_towers_stay_in_eval_mode(tiny_paths):
    backbone, model = _classifier(tiny_paths["clip"], _config("frozen", "lora"))
    for _ in range(2):
        model.train()
        assert model.training and model.head.training
        assert not any(m.training for m in model.base.text_model.modules())
        assert not model.base.text_projection.training
        assert all(m.training for m in model.base.vision_model.modules())
        model.eval()
        assert not any(m.training for m in model.modules())


def test_frozen_towers_stay_in_eval_mode_without_adapters(tiny_paths):
    backbone, model = _classifier(tiny_paths["blip"], _config("frozen", "frozen"))
    assert model.backbone is backbone.model  # nothing to wrap
    model.train()
    assert model.head.training
    for name in ("text_encoder", "text_proj", "vision_model", "vision_proj"):
        assert not any(m.training for m in getattr(model.base, name).modules()), name


def test_forward_returns_a_loss_when_asked_and_logits_otherwise(tiny_paths):
    from transformers.modeling_outputs import SequenceClassifierOutput

    backbone, model = _classifier(tiny_paths["clip"], _config("lora", "lora"))
    batch = _batch(backbone)
    model.eval()
    logits = model(**batch)  # what the loop, evaluation, merge and predict call: a tensor, labels in the batch
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 2)
    out = model(**batch, return_loss=True)
    assert isinstance(out, SequenceClassifierOutput)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits.float(), batch["labels"]))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    unlabelled = dict(batch, labels=torch.tensor([1, -1]))
    torch.testing.assert_close(model(**unlabelled, return_loss=True).loss,
                               F.cross_entropy(logits[:1].float(), torch.tensor([1])))
    with pytest.raises(ValueError, match=r"return_loss=True\) needs `labels`"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"], return_loss=True)
