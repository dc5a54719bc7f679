"""Quantized backbones (QLoRA) through bitsandbytes on the CPU: loading per family and setting, what stays bf16,
training on top, the save / load round trip, gradient checkpointing, 8-bit optimizers and the clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from mmpeft import build_classifier, get_family, load_adapter, load_backbone, load_config, save_adapter  # noqa: E402
from mmpeft.config import QuantConfig  # noqa: E402
from mmpeft.export.merge import probe_batch  # noqa: E402
from mmpeft.models.classifier import enable_gradient_checkpointing  # noqa: E402
from mmpeft.quant import (  # noqa: E402
    QuantizationError,
    bnb_config,
    check_device,
    matches,
    quantization_report,
    quantize_linears,
    quantized_modules,
    skip_patterns,
)
from mmpeft.training.optim import build_optimizer  # noqa: E402

FAMILIES = ("clip", "siglip", "blip")
SETTINGS = {"nf4": "{bits: 4, quant_type: nf4}", "fp4": "{bits: 4, quant_type: fp4, double_quant: false}",
            "int8": "{bits: 8}"}
NO_DROPOUT = ["model.text.lora.dropout=0.0", "model.vision.lora.dropout=0.0", "head.dropout=0.0", "head.hidden=0"]



def _cfg(path, *extra):
    return load_config(None, [f"model.name={path}", *NO_DROPOUT, *extra])


def _classifier(path, *extra, seed=0):
    cfg = _cfg(path, *extra)
    backbone = load_backbone(cfg.model.name, dtype=cfg.model.dtype, quantization=cfg.model.quantization)
    torch.manual_seed(seed)
    model = build_classifier(backbone, cfg, ["negative", "positive"])
    model.source, model.config = backbone, cfg
    return backbone, model, cfg


def _randomize_lora_b(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


# --- loading ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_load_and_qlora_training(tiny_paths, family, setting):
    """Each family in nf4, fp4 and int8: layers, skip list and bf16 elsewhere, same fingerprint, LoRA trains."""
    backbone, model, cfg = _classifier(tiny_paths[family], f"model.quantization={SETTINGS[setting]}",
                                       "model.gradient_checkpointing=true")
    quant = cfg.model.quantization
    spec = backbone.family
    layer_cls = bnb.nn.Linear8bitLt if quant.bits == 8 else bnb.nn.Linear4bit
    layers = {n: m for n, m in model.base.named_modules() if isinstance(m, layer_cls)}
    assert layers and all(spec.tower_of(n) or n == "itm_head" for n in layers)
    if quant.bits == 4:
        assert {m.weight.quant_type for m in layers.values()} == {setting}
    # the family's skip list stays plain bf16 linear layers
    for name, module in model.base.named_modules():
        if matches(name, list(spec.quant_skip)):
            assert not isinstance(module, layer_cls), name
    # everything that is not quantized is stored in bf16; the adapter and the head train in float32
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32, name
        elif param.is_floating_point():
            assert param.dtype == torch.bfloat16, name
    assert backbone.fingerprint == load_backbone(str(tiny_paths[family])).fingerprint
    report = quantization_report(backbone.model, spec, quant)
    assert report["quantized"]["modules"] == len(quantized_modules(backbone.model))
    kept_dtypes = {d for entry in report["kept"].values() for d in entry["dtypes"]}
    assert kept_dtypes == {"bfloat16"}
    if spec.quant_skip:
        assert report["kept"]["skip list"]["params"] > 0

    _randomize_lora_b(model)
    batch = probe_batch(model, 4)
    labels = torch.tensor([0, 1, 0, 1])
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    optimizer = build_optimizer(model, cfg.train)
    model.train()
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(**batch), labels)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    for tower in ("text", "vision"):
        changed = [n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(p, lora[n])
                   and spec.tower_of(n.removeprefix("backbone.base_model.model.")) == tower]
        assert changed, f"no LoRA weight of the {tower} tower changed"


def test_one_tower_quantized_other_trains_full(tiny_paths):
    backbone, model, _ = _classifier(tiny_paths["clip"], "model.quantization={towers: [vision]}",
                                     "model.text.mode=full")
    names = quantized_modules(backbone.model)
    assert names and {backbone.family.tower_of(n) for n in names} == {"vision"}
    text = [p for n, p in model.named_parameters() if "text_model" in n and p.requires_grad]
    assert text and all(p.dtype == torch.float32 for p in text)  # full towers keep float32 master weights
    bnb_cfg = bnb_config(QuantConfig(towers=["vision"]), backbone.family)
    assert "text_model" in bnb_cfg.llm_int8_skip_modules and "visual_projection" in bnb_cfg.llm_int8_skip_modules


def test_swapping_linears_matches_transformers_loading(tiny_paths):
    """The seam for towers transformers does not build gives the layers BitsAndBytesConfig gives."""
    _, loaded, cfg = _classifier(tiny_paths["clip"], "model.quantization={bits: 4}")
    plain_cfg = _cfg(tiny_paths["clip"], "model.quantization={bits: 4}")
    plain = load_backbone(plain_cfg.model.name)  # unquantized float32: build_classifier quantizes it in place
    torch.manual_seed(0)
    swapped = build_classifier(plain, plain_cfg, ["negative", "positive"])
    assert quantized_modules(swapped.base) == quantized_modules(loaded.base)
    assert plain.fingerprint == loaded.source.fingerprint
    swapped.head.load_state_dict(loaded.head.state_dict())
    batch = probe_batch(loaded, 4)
    loaded.eval(), swapped.eval()
    with torch.no_grad():
        torch.testing.assert_close(swapped(**batch), loaded(**batch))


def test_swap_keeps_multihead_attention_and_skips(tiny_paths):
    model = load_backbone(str(tiny_paths["siglip"]), dtype="bfloat16").model
    spec = get_family("siglip")
    swapped = quantize_linears(model, QuantConfig(), skip_patterns(spec, QuantConfig()))
    assert not any(n.startswith("vision_model.head.attention") or n.startswith("text_model.head") for n in swapped)
    assert isinstance(model.vision_model.head.attention, nn.MultiheadAttention)


def test_qlora_adapter_round_trip(tiny_paths, tmp_path):
    """save_adapter -> load_adapter of a QLoRA classifier: same quantized base, identical logits."""
    backbone, model, cfg = _classifier(tiny_paths["clip"], "model.quantization={bits: 4}")
    _randomize_lora_b(model)
    save_adapter(model, tmp_path, cfg, backbone_name=cfg.model.name, backbone_revision=None,
                 fingerprint=backbone.fingerprint)
    again = load_adapter(tmp_path)
    assert quantized_modules(again.base) == quantized_modules(model.base)
    batch = probe_batch(model, 4)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch), model(**batch), rtol=0, atol=0)


# --- gradient checkpointing ---------------------------------------------------------------------------------------


def _grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(**batch), torch.tensor([0, 1, 0, 1])).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family,text,vision,head", [
    ("clip", "lora", "lora", "concat"), ("clip", "full", "frozen", "cross_attention"),
    ("clip", "frozen", "lora", "gated"), ("siglip", "lora", "full", "concat"), ("blip", "lora", "lora", "concat"),
])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_paths, family, text, vision, head):
    extra = [f"model.text.mode={text}", f"model.vision.mode={vision}", f"head.type={head}"]
    _, plain, _ = _classifier(tiny_paths[family], *extra)
    _, ckpt, _ = _classifier(tiny_paths[family], *extra, "model.gradient_checkpointing=true")
    _randomize_lora_b(plain), _randomize_lora_b(ckpt)
    batch = probe_batch(plain, 4)
    from transformers.modeling_layers import GradientCheckpointingLayer

    spec, modes = ckpt.family, {"text": text, "vision": vision}
    last = {}  # tower -> its last encoder layer (the running copy of a full tower)
    for name, module in ckpt.base.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and "original_module" not in name:
            last[spec.tower_of(name)] = module
    assert set(last) == {"text", "vision"} and all(m.gradient_checkpointing for m in last.values())
    assert not hasattr(ckpt.base, "_require_grads_hook")  # non-reentrant: no hook on the input embeddings
    calls = {tower: 0 for tower in last}
    # transformers checkpoints a layer's `forward`, so count a norm inside it (its hooks run on recomputation)
    norms = {t: next(x for x in m.modules() if isinstance(x, nn.LayerNorm)) for t, m in last.items()}
    hooks = [m.register_forward_hook(lambda *_, t=t: calls.__setitem__(t, calls[t] + 1)) for t, m in norms.items()]
    expected, got = _grads(plain, batch), _grads(ckpt, batch)
    for hook in hooks:
        hook.remove()
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    # a checkpointed layer runs again in the backward pass; a frozen tower runs once, without autograd
    assert calls == {t: 1 if modes[t] == "frozen" else 2 for t in calls}


def test_checkpointing_refused_without_support():
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(nn.Linear(2, 2))


# --- optimizers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers(kind):
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 2))
    cfg = load_config(None, [f"train.optimizer={kind}"]).train
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)  # no GPU: nothing to page
    assert {g["lr"] for g in optimizer.param_groups} == {cfg.lr_full}
    before = model[0].weight.detach().clone()
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model[0].weight)
    assert optimizer.state[model[0].weight]["state1"].dtype == torch.uint8


# --- errors -------------------------------------------------------------------------------------------------------


def test_config_errors_name_the_key():
    with pytest.raises(ValueError) as err:
        load_config(None, ["model.quantization={bits: 3, quant_type: int4, compute_dtype: float64, towers: [audio]}",
                           "train.optimizer=sgd"])
    for key in ("model.quantization.bits", "model.quantization.quant_type", "model.quantization.compute_dtype",
                "model.quantization.towers", "train.optimizer"):
        assert key in str(err.value)
    with pytest.raises(ValueError, match=r"includes text but `model.text.mode=full`.*towers=\[vision\]"):
        load_config(None, ["model.quantization={bits: 4}", "model.text.mode=full"])
    assert load_config(None, ["model.quantization=null"]).model.quantization is None


def test_missing_bitsandbytes_is_a_clear_error(tiny_paths, monkeypatch):
    import mmpeft.quant as quant

    monkeypatch.setattr(quant, "is_bnb_available", lambda: False)
    with pytest.raises(QuantizationError, match=r"bits=4` needs bitsandbytes.*pip install"):
        load_backbone(str(tiny_paths["clip"]), quantization=QuantConfig())
    with pytest.raises(QuantizationError, match=r"adamw_8bit` needs bitsandbytes"):
        build_optimizer(nn.Linear(2, 2), load_config(None, ["train.optimizer=adamw_8bit"]).train)


def test_unsupported_device_is_refused(tiny_paths):
    with pytest.raises(QuantizationError, match=r"cannot run quantized layers on 'meta'"):
        load_backbone(str(tiny_paths["clip"]), quantization=QuantConfig(), device="meta")
    assert check_device("cpu").type == "cpu"


def test_fsdp_needs_quant_storage_in_the_compute_dtype(tiny_paths, monkeypatch):
    spec = get_family("clip")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert bnb_config(QuantConfig(), spec).bnb_4bit_quant_storage == torch.bfloat16
    with pytest.raises(QuantizationError, match=r"storage_dtype=bfloat16"):
        bnb_config(QuantConfig(storage_dtype="uint8"), spec)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert bnb_config(QuantConfig(), spec).bnb_4bit_quant_storage == torch.uint8


def test_full_training_of_a_quantized_tower_is_refused(tiny_paths):
    backbone = load_backbone(str(tiny_paths["clip"]), quantization=QuantConfig())
    cfg = _cfg(tiny_paths["clip"], "model.text.mode=full")  # no quantization asked, but the weights are 4-bit
    with pytest.raises(QuantizationError, match=r"`model.text.mode=full` but the text tower .* 4-bit"):
        build_classifier(backbone, cfg, ["a", "b"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_qlora_trains_on_cuda(tiny_paths, setting):
    cfg = _cfg(tiny_paths["clip"], f"model.quantization={SETTINGS[setting]}", "model.gradient_checkpointing=true",
               "train.optimizer=paged_adamw_8bit")
    backbone = load_backbone(cfg.model.name, dtype=cfg.model.dtype, quantization=cfg.model.quantization,
                             device="cuda")
    assert all(backbone.model.get_submodule(n).weight.is_cuda for n in quantized_modules(backbone.model))
    model = build_classifier(backbone, cfg, ["negative", "positive"]).cuda()
    model.source, model.config = backbone, cfg
    _randomize_lora_b(model)
    optimizer = build_optimizer(model, cfg.train)
    assert isinstance(optimizer, bnb.optim.PagedAdamW8bit)
    batch = probe_batch(model, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.train()
    F.cross_entropy(model(**batch), torch.tensor([0, 1, 0, 1], device="cuda")).backward()
    optimizer.step()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)
