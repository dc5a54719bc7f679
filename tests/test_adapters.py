"""Per-tower adapters and LoRA settings: exactly the intended modules train, and every one of them learns (heads:
test_heads.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import (
    FAMILIES,
    LABELS,
    NON_TOWER,
    TOWER_COMBOS,
    assert_grads,
    expected_lora_modules,
    lora_num_layers,
    make_batch,
    make_classifier,
    make_config,
    plain,
    randomize_lora_b,
    tower_params,
    train_step,
)
from peft.tuners.lora import LoraLayer

from mmpeft.backbones import get_family, load_backbone
from mmpeft.config import load_config
from mmpeft.models.adapters import (
    build_lora_config,
    format_trainable,
    lora_module_names,
    tower_targets,
    trainable_report,
)
from mmpeft.models.classifier import build_classifier

# --- tower modes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text_mode,vision_mode", TOWER_COMBOS, ids=lambda m: m)
@pytest.mark.parametrize("family", FAMILIES)
def test_tower_modes_train_exactly_the_intended_parameters(tiny_paths, family, text_mode, vision_mode):
    backbone, model = make_classifier(tiny_paths[family], make_config(text_mode, vision_mode))
    config = backbone.model.config
    modes = {"text": text_mode, "vision": vision_mode}

    expected_lora = set()
    expected_trainable = {f"head.{n}" for n, _ in model.head.named_parameters()}
    for tower, mode in modes.items():
        if mode == "lora":
            modules = expected_lora_modules(family, config, tower)
            expected_lora |= modules
            expected_trainable |= {f"{m}.lora_{ab}.default.weight" for m in modules for ab in "AB"}
        elif mode == "full":
            expected_trainable |= tower_params(family, tiny_paths[family], tower)

    lora = set(lora_module_names(model.backbone))
    assert lora == expected_lora
    assert not any("crossattention" in n for n in lora)
    assert not any(n.startswith("vision_model.head") for n in lora)
    trainable = {plain(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable

    base = dict(model.base.named_parameters())
    for name in NON_TOWER[family]:
        assert not base[name].requires_grad, name
    if family == "blip":
        cross = [n for n, p in model.named_parameters() if "crossattention" in n]
        assert cross and not any(p.requires_grad for n, p in model.named_parameters() if "crossattention" in n)

    randomize_lora_b(model)
    logits = train_step(model, make_batch(backbone))
    assert logits.shape == (2, len(LABELS))
    assert_grads(model)


def test_full_tower_is_a_trainable_copy(tiny_paths):
    """peft's modules_to_save: the trained copy is used in forward, the original stays frozen and untouched."""
    backbone, model = make_classifier(tiny_paths["clip"], make_config("full", "frozen"))
    names = dict(model.named_parameters())
    copies = [n for n in names if ".modules_to_save.default." in n]
    originals = [n for n in names if ".original_module." in n]
    assert copies and originals
    assert all(names[n].requires_grad for n in copies)
    assert not any(names[n].requires_grad for n in originals)
    assert not any(p.requires_grad for n, p in names.items() if "vision_model" in n or "visual_projection" in n)


# --- LoRA settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_layers_restricts_to_the_last_layers(tiny_paths, family):
    backbone, model = make_classifier(tiny_paths[family], make_config("lora", "lora", "concat", "full",
                                                              "model.text.lora.layers=1"))
    config = backbone.model.config
    assert lora_num_layers(config, "text") == 2
    expected = expected_lora_modules(family, config, "text", last=1) | expected_lora_modules(family, config, "vision")
    assert set(lora_module_names(model.backbone)) == expected


def test_lora_layers_out_of_range_raises(tiny_paths):
    backbone = load_backbone(str(tiny_paths["clip"]))
    with pytest.raises(ValueError, match=r"`model.text.lora.layers=5` but the text tower has 2 layers"):
        build_lora_config(backbone, make_config("lora", "lora", "concat", "full", "model.text.lora.layers=5").model)
    settings = make_config("lora", "lora", "concat", "full", "model.text.lora.layers=1",
                       "model.text.lora.targets=text_model.encoder.layers.0.mlp.fc1").model.text.lora
    with pytest.raises(ValueError, match=r"needs `\{layer\}` in the target regex"):
        tower_targets(backbone.family, "text", settings, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_and_alpha_per_tower(tiny_paths, family):
    cfg = make_config("lora", "lora", "concat", "full", "model.text.lora.r=8", "model.text.lora.alpha=16",
                  "model.vision.lora.r=4", "model.vision.lora.alpha=2")
    backbone, model = make_classifier(tiny_paths[family], cfg)
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
    cfg = make_config("lora", "lora", "concat", "full", "model.text.lora.use_dora=true", "model.vision.lora.use_dora=true")
    backbone, model = make_classifier(tiny_paths["clip"], cfg)
    modules = dict(model.backbone.named_modules())
    names = lora_module_names(model.backbone)
    assert names
    for name in names:
        assert "default" in modules[f"base_model.model.{name}"].lora_magnitude_vector, name
    randomize_lora_b(model)
    train_step(model, make_batch(backbone))
    assert_grads(model)


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
    cfg = make_config("lora", "lora", "concat", "full", "model.text.lora.targets=no_such_module")
    with pytest.raises(ValueError, match=r"`model.text.mode=lora` but no module .* matches the text target regex; "
                                         r"check `model.text.lora.targets`"):
        make_classifier(tiny_paths["clip"], cfg)
    cfg = make_config("lora", "frozen", "concat", "full", "model.text.lora.targets=no_such_module")
    with pytest.raises(ValueError, match="peft could not attach the adapter"):
        make_classifier(tiny_paths["clip"], cfg)


def test_custom_targets_are_used(tiny_paths):
    targets = r"text_model\.encoder\.layers\.{layer}\.mlp\.fc(1|2)"
    cfg = make_config("lora", "frozen", "concat", "full", f"model.text.lora.targets={targets}")
    backbone, model = make_classifier(tiny_paths["clip"], cfg)
    assert set(lora_module_names(model.backbone)) == {
        f"text_model.encoder.layers.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)}


# --- reporting and modes --------------------------------------------------------------------------------------


def test_trainable_report_counts_by_hand(tiny_paths):
    r = 8
    backbone, model = make_classifier(tiny_paths["clip"], make_config("lora", "lora", "concat", "full",
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
        adapters[tower] = lora_num_layers(fresh.config, tower) * 4 * r * (hidden + hidden)
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
    plain = trainable_report(make_classifier(tiny_paths["clip"], make_config("lora", "lora"))[1])
    cfg = make_config("lora", "lora", "concat", "full", "model.quantization={bits: 4}")
    backbone = load_backbone(str(tiny_paths["clip"]), quantization=cfg.model.quantization)
    quantized = trainable_report(build_classifier(backbone, cfg, LABELS))
    assert quantized == plain  # a Params4bit of shape (n/2, 1) holds n weights


def test_lora_module_names_are_relative_to_the_backbone_from_any_wrapper(tiny_paths):
    backbone, model = make_classifier(tiny_paths["clip"], make_config("lora", "frozen"))
    names = lora_module_names(model.backbone)
    assert names == lora_module_names(model)  # the classifier: same names, no `backbone.base_model.model.`
    assert names[0].startswith("text_model.encoder.layers.0.") and all(
        isinstance(backbone.model.get_submodule(n), LoraLayer) for n in names)


def test_frozen_towers_stay_in_eval_mode(tiny_paths):
    backbone, model = make_classifier(tiny_paths["clip"], make_config("frozen", "lora"))
    for _ in range(2):
        model.train()
        assert model.training and model.head.training
        assert not any(m.training for m in model.base.text_model.modules())
        assert not model.base.text_projection.training
        assert all(m.training for m in model.base.vision_model.modules())
        model.eval()
        assert not any(m.training for m in model.modules())


def test_frozen_towers_stay_in_eval_mode_without_adapters(tiny_paths):
    backbone, model = make_classifier(tiny_paths["blip"], make_config("frozen", "frozen"))
    assert model.backbone is backbone.model  # nothing to wrap
    model.train()
    assert model.head.training
    for name in ("text_encoder", "text_proj", "vision_model", "vision_proj"):
        assert not any(m.training for m in getattr(model.base, name).modules()), name


def test_forward_returns_a_loss_when_asked_and_logits_otherwise(tiny_paths):
    from transformers.modeling_outputs import SequenceClassifierOutput

    backbone, model = make_classifier(tiny_paths["clip"], make_config("lora", "lora"))
    batch = make_batch(backbone)
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
