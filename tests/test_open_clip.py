"""open_clip backbones: loading offline (config file + safetensors), the CLIP tokenizer and padding, LoRA on
nn.MultiheadAttention (exact modules, bit-exact frozen weights, stock peft round trip onto a plain open_clip model,
merge), every tower mode and head, and the clear refusals."""

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
from peft import PeftModel

from mmpeft import build_classifier, get_family, load_adapter, load_backbone, save_adapter
from mmpeft.backbones import BackboneError
from mmpeft.config import HEAD_TYPES
from mmpeft.models.adapters import lora_module_names, pin_mha_base_weights

TEXTS = ["a photo of a cat", "What a LOVELY day!!  really", "two dogs & a ball, 3 cats"]




def _parts(name: str) -> tuple[str, str]:
    """`open_clip:<json>@<file>` -> (architecture name, checkpoint file)."""
    arch, _, weights = name.removeprefix("open_clip:").partition("@")
    return arch.rsplit("/", 1)[1].removesuffix(".json"), weights


def _native(name: str, **kwargs):
    """The same checkpoint through open_clip alone (`tiny_open_clip` registered its config)."""
    import open_clip

    arch, weights = _parts(name)
    return open_clip.create_model(arch, pretrained=weights, **kwargs).eval()


# --- loading -----------------------------------------------------------------------------------------------------


def test_loads_offline_and_matches_open_clip(tiny_open_clip):
    import open_clip

    backbone = load_backbone(tiny_open_clip)
    assert backbone.family is get_family("open_clip") and backbone.name == tiny_open_clip
    assert set(dict(backbone.model.named_children())) == {"text", "visual"}  # CustomTextCLIP: towers as submodules
    assert backbone.embed_dims == {"text": 16, "vision": 16, "text_tokens": 32, "vision_tokens": 32}
    assert backbone.max_text_length == 77 and backbone.text_padding == "longest"
    assert not any(p.requires_grad for p in backbone.model.parameters())
    # The tokenizer gives open_clip's ids; padding the batch to its longest text gives open_clip's embeddings.
    reference = open_clip.get_tokenizer("ViT-B-16")(TEXTS)
    ids = backbone.tokenizer(TEXTS, truncation=True, max_length=77, padding=False)["input_ids"]
    assert ids == [row[row != 0].tolist() for row in reference]
    native = _native(tiny_open_clip)  # classic CLIP layout: the text tower's parts at the top level
    batch = make_batch(backbone, TEXTS)
    assert batch["input_ids"].shape[1] < 77
    with torch.no_grad():
        text = backbone.family.encode_text(backbone.model, batch["input_ids"], batch["attention_mask"])
        image = backbone.family.encode_image(backbone.model, batch["pixel_values"])
        torch.testing.assert_close(text.pooled, native.encode_text(reference), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(image.pooled, native.encode_image(batch["pixel_values"]), rtol=1e-5, atol=1e-6)
    assert text.tokens.shape == (3, batch["input_ids"].shape[1], 32) and image.tokens.shape == (3, 16, 32)
    # Random, seeded weights without `@`: the same every time, and not the checkpoint's.
    arch_only = tiny_open_clip.partition("@")[0]
    assert load_backbone(arch_only).fingerprint == load_backbone(arch_only).fingerprint != backbone.fingerprint


def test_text_embedding_independent_of_batch_mates(tiny_open_clip):
    backbone = load_backbone(tiny_open_clip)
    short, mixed = make_batch(backbone, TEXTS[:2]), make_batch(backbone, TEXTS[:2] + ["a " * 40 + "long one"])
    assert mixed["input_ids"].shape[1] > short["input_ids"].shape[1]
    with torch.no_grad():
        alone = backbone.family.encode_text(backbone.model, short["input_ids"], short["attention_mask"]).pooled
        together = backbone.family.encode_text(backbone.model, mixed["input_ids"], mixed["attention_mask"]).pooled
    torch.testing.assert_close(together[:2], alone)


def test_loading_errors(tiny_open_clip, tmp_path):
    from safetensors.torch import load_file

    with pytest.raises(BackboneError, match=r"open_clip has no model config 'ViT-Nope'\. Available: \["):
        load_backbone("open_clip:ViT-Nope")
    with pytest.raises(BackboneError, match=r"'nope' is neither a checkpoint file nor an open_clip pretrained tag "
                                            r"of ViT-B-16; its tags: \[.*'openai'"):
        load_backbone("open_clip:ViT-B-16@nope")
    with pytest.raises(BackboneError, match="tokenizer .* comes from the Hugging Face Hub"):
        load_backbone("open_clip:ViT-B-16-SigLIP")
    # Pickle checkpoints only when trusted, and then through torch.load(weights_only=True).
    config, weights = tiny_open_clip.removeprefix("open_clip:").split("@")
    pickle_file = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(load_file(weights), pickle_file)
    with pytest.raises(BackboneError, match="trust_pickle_weights"):
        load_backbone(f"open_clip:{config}@{pickle_file}")
    trusted = load_backbone(f"open_clip:{config}@{pickle_file}", trust_pickle_weights=True)
    assert trusted.fingerprint == load_backbone(tiny_open_clip).fingerprint
    # A checkpoint missing tower weights would train from random weights: refused, naming them.
    partial = tmp_path / "partial.safetensors"
    state = load_file(weights)
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if not k.startswith("transformer.resblocks.1.")}, partial)
    with pytest.raises(BackboneError, match=r"tower weight\(s\) missing .*text\.transformer\.resblocks\.1\."):
        load_backbone(f"open_clip:{config}@{partial}")


def test_pretrained_tag_offline_says_what_to_do(monkeypatch):
    import open_clip

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(BackboneError, match=r"could not fetch the pretrained weights for tag 'openai' .* copy the "
                                            r"checkpoint file onto this machine .*open_clip:ViT-B-32@/path/to/"):
        load_backbone("open_clip:ViT-B-32@openai")


# --- LoRA on nn.MultiheadAttention ----------------------------------------------------------------------------


def _expected_lora(tower: str, layers=range(2)) -> set[str]:
    prefix = "text" if tower == "text" else "visual"
    attn = [f"{prefix}.transformer.resblocks.{i}.attn" for i in layers]
    return set(attn) | {f"{a}.base_layer.out_proj" for a in attn}  # peft's MHA LoRA covers in_proj and out_proj


@pytest.mark.parametrize("text_mode,vision_mode", TOWER_COMBOS, ids=lambda m: m)
def test_tower_modes_train_exactly_the_intended_parameters(tiny_open_clip, text_mode, vision_mode):
    backbone = load_backbone(tiny_open_clip)
    model = build_classifier(backbone, make_config(text_mode, vision_mode), ["negative", "positive"])
    modes = {"text": text_mode, "vision": vision_mode}
    expected_lora, expected_trainable = set(), {f"head.{n}" for n, _ in model.head.named_parameters()}
    fresh = load_backbone(tiny_open_clip).model
    for tower, mode in modes.items():
        if mode == "lora":
            modules = _expected_lora(tower)
            expected_lora |= modules
            in_proj = {f"{m}.lora_{ab}.default.weight" for m in modules if m.endswith("attn") for ab in "AB"}
            out_proj = {f"{m}.lora_{ab}.default.weight" for m in modules if m.endswith("out_proj") for ab in "AB"}
            expected_trainable |= in_proj | out_proj
        elif mode == "full":
            expected_trainable |= {n for n, _ in fresh.named_parameters() if backbone.family.tower_of(n) == tower}
    assert set(lora_module_names(model.backbone)) == expected_lora
    trainable = {plain(n).replace(".base_layer.", ".") if "lora_" not in n else plain(n)
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable
    assert not model.base.logit_scale.requires_grad
    randomize_lora_b(model)
    train_step(model, make_batch(backbone, TEXTS[:2]))
    assert_grads(model)


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
@pytest.mark.parametrize("head", HEAD_TYPES)
def test_every_head(tiny_open_clip, head, mode):
    backbone = load_backbone(tiny_open_clip)
    model = build_classifier(backbone, make_config(*head_towers(head, mode), head), ["cat", "dog", "bird"])
    randomize_lora_b(model)
    batch = make_batch(backbone, TEXTS[:2])
    batch["labels"] = torch.tensor([0, 2])
    logits = train_step(model, batch)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert_grads(model)


def test_lora_on_last_layer_only(tiny_open_clip):
    backbone = load_backbone(tiny_open_clip)
    model = build_classifier(backbone, make_config("lora", "lora", "concat", "full", "model.text.lora.layers=1"), ["a", "b"])
    assert set(lora_module_names(model.backbone)) == _expected_lora("text", [1]) | _expected_lora("vision")


def test_frozen_weights_stay_bit_exact_under_mha_lora(tiny_open_clip):
    """peft merges the update into the base weights and subtracts it after every forward; in bf16 that alone moves
    the frozen weights. mmpeft puts the original parameters back after each forward."""
    from peft import LoraConfig, get_peft_model

    def bf16_classifier():
        backbone = load_backbone(tiny_open_clip, dtype="bfloat16")
        return backbone, build_classifier(backbone, make_config("lora", "lora"), ["negative", "positive"])

    backbone, model = bf16_classifier()
    before = {k: v.clone() for k, v in load_backbone(tiny_open_clip, dtype="bfloat16").model.state_dict().items()}
    randomize_lora_b(model)
    batch = make_batch(backbone, TEXTS[:2])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        train_step(model, batch)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        for _ in range(5):
            model(**batch)
    after = {k.replace(".base_layer", ""): v for k, v in model.base.state_dict().items() if "lora_" not in k}
    assert before.keys() == after.keys()
    assert not [k for k in before if not torch.equal(before[k], after[k])]

    # The check has teeth: plain peft, same adapter, drifts.
    plain = load_backbone(tiny_open_clip, dtype="bfloat16").model
    weight = plain.visual.transformer.resblocks[0].attn.in_proj_weight.detach().clone()
    peft_model = get_peft_model(plain, LoraConfig(r=4, target_modules=r"visual\.transformer\.resblocks\.\d+\.attn"))
    randomize_lora_b(peft_model)
    with torch.no_grad():
        for _ in range(5):
            plain.visual(batch["pixel_values"].bfloat16())
    assert not torch.equal(plain.visual.transformer.resblocks[0].attn.base_layer.in_proj_weight, weight)
    assert pin_mha_base_weights(peft_model) == 2  # one guard per LoRA-wrapped attention layer


def test_dora_and_compile_are_refused(tiny_open_clip, monkeypatch):
    backbone = load_backbone(tiny_open_clip)
    cfg = make_config("lora", "lora", "concat", "full", "model.text.lora.use_dora=true", "model.vision.lora.use_dora=true")
    with pytest.raises(ValueError, match="peft could not attach the adapter .*MultiheadAttention does not support "
                                         "DoRA"):
        build_classifier(backbone, cfg, ["a", "b"])
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    with pytest.raises(ValueError, match=r"cannot be compiled: .*dynamo_backend=inductor"):
        build_classifier(load_backbone(tiny_open_clip), make_config("lora", "frozen"), ["a", "b"])
    build_classifier(load_backbone(tiny_open_clip), make_config("frozen", "frozen"), ["a", "b"])  # nothing to compile


# --- saving -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modes", [("lora", "lora"), ("full", "lora")], ids=lambda m: "-".join(m))
def test_stock_peft_round_trip_and_merge(tiny_open_clip, tmp_path, modes):
    """The adapter loads with plain peft onto a plain open_clip model and gives the trained towers bit for bit;
    peft's merge of the MHA LoRA matches the unmerged model."""
    from mmpeft.config import load_config

    cfg = load_config(None, [f"model.name={tiny_open_clip}", f"model.text.mode={modes[0]}",
                             f"model.vision.mode={modes[1]}", "model.text.lora.dropout=0",
                             "model.vision.lora.dropout=0"])
    backbone = load_backbone(tiny_open_clip)
    model = build_classifier(backbone, cfg, ["negative", "positive"])
    randomize_lora_b(model)
    batch = make_batch(backbone, TEXTS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        train_step(model, batch)
        optimizer.step()
    save_adapter(model, tmp_path, cfg, backbone_name=backbone.name, backbone_revision=None,
                 fingerprint=backbone.fingerprint)
    assert json.loads((tmp_path / "mmpeft.json").read_text())["backbone"]["family"] == "open_clip"

    # Like with like: bit-exactness needs the same weights and the same requires_grad (nn.MultiheadAttention's
    # input projection takes another kernel path for a trainable weight). Stock peft freezes by default, as
    # load_adapter does; the model in training compares with peft's `is_trainable=True`.
    stock = PeftModel.from_pretrained(_native(tiny_open_clip, force_custom_text=True), tmp_path).eval()
    stock_trainable = PeftModel.from_pretrained(_native(tiny_open_clip, force_custom_text=True), tmp_path,
                                                is_trainable=True).eval()
    loaded = load_adapter(tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert ({n for n, p in stock_trainable.named_parameters() if p.requires_grad}
            == {n.removeprefix("backbone.") for n, p in model.named_parameters() if p.requires_grad
                and n.startswith("backbone.")})
    model.eval()
    family = backbone.family
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    with torch.no_grad():
        for ours, theirs in ((model, stock_trainable), (loaded, stock)):
            assert torch.equal(family.encode_text(theirs.get_base_model(), ids, mask).pooled,
                               ours.encode_text(ids, mask).pooled)
            assert torch.equal(theirs.get_base_model().visual(pixels), ours.encode_image(pixels).pooled)
        assert torch.equal(load_adapter(tmp_path, is_trainable=True)(**batch), model(**batch))
        merged = stock.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(family.encode_text(merged, ids, mask).pooled, model.encode_text(ids, mask).pooled,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged.visual(pixels), model.encode_image(pixels).pooled, rtol=1e-5, atol=1e-6)
    from mmpeft.export.merge import merge

    with pytest.raises(ValueError, match="not a transformers model.*merge_and_unload"):
        merge(tmp_path, tmp_path / "merged")  # `mmpeft merge` writes transformers folders only


@pytest.mark.slow
def test_fsdp2_two_ranks_match_one_process(tiny_open_clip, tmp_path):
    """peft's MHA LoRA re-registers weights inside forward; under FSDP2 (2 CPU ranks, open_clip's resblocks
    wrapped) training still ends where one process with twice the batch ends."""
    from pathlib import Path

    from conftest import assert_same_saved_weights, write_manifest
    from test_distributed import QUIET, launch_two_ranks

    from mmpeft import train
    from mmpeft.config import load_config

    root = Path(__file__).resolve().parents[1]
    fsdp = (root / "recipes" / "accelerate" / "cpu_fsdp2_two_ranks.yaml").read_text()
    config = tmp_path / "fsdp2_open_clip.yaml"
    config.write_text(fsdp.replace("CLIPEncoderLayer", "ResidualAttentionBlock"))
    rows = [{"text": f"a {['red', 'blue'][i % 2]} thing number {i}", "label": ["r", "b"][i % 2],
             "color": ((200, 30 + 9 * i, 30), (30, 30 + 9 * i, 200))[i % 2]} for i in range(16)]
    data = write_manifest(tmp_path / "data", rows)
    common = [f"model.name={tiny_open_clip}", f"data.train={data}", f"data.eval={data}", "model.text.lora.dropout=0",
              "model.vision.lora.dropout=0", "head.dropout=0", "train.epochs=2", "train.lr_lora=5e-3",
              "train.lr_head=5e-3", *QUIET]
    two = launch_two_ranks([*common, "data.batch_size=4", f"train.output_dir={tmp_path / 'two'}"], str(config))
    assert two.returncode == 0, two.stderr[-6000:]
    train(load_config(None, [*common, "data.batch_size=8", f"train.output_dir={tmp_path / 'one'}"]))
    assert_same_saved_weights(tmp_path / "one", tmp_path / "two")
