"""`mmpeft inspect OUT_DIR`: the LoRA modules of each tower grouped by layer pattern, ranks, trained weights and
the saved files, read from a run folder saved the way training saves it."""

from __future__ import annotations

import json

from mmpeft import build_classifier, load_backbone, load_config, save_adapter
from mmpeft.cli import main
from mmpeft.export.inspection import layer_patterns


def test_inspect_lists_lora_modules_per_tower(tiny_paths, tmp_path, capsys):
    cfg = load_config(None, [f"model.name={tiny_paths['clip']}", "model.text.lora.r=4", "model.text.lora.alpha=8",
                             "model.vision.lora.r=2", "model.vision.lora.layers=1"])
    backbone = load_backbone(cfg.model.name)
    model = build_classifier(backbone, cfg, ["cat", "dog"])
    save_adapter(model, tmp_path / "run", cfg, backbone_name=cfg.model.name, backbone_revision=None,
                 fingerprint=backbone.fingerprint)
    trained = {tower: sum(p.numel() for n, p in model.named_parameters()
                          if p.requires_grad and f"{tower}_model." in n and "lora_" in n) for tower in ("text", "vision")}
    assert main(["inspect", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    layers = backbone.family.num_layers(backbone.model.config, "text")
    every = ",".join(str(i) for i in range(layers))
    assert (f"text tower: {4 * layers} LoRA module(s), {trained['text']:,} trained weights\n"
            f"  text_model.encoder.layers.{{{every}}}.self_attn.{{k_proj,q_proj,v_proj,out_proj}}  r=4 alpha=8  "
            f"({4 * layers} modules)") in out
    # the vision tower keeps the default alpha (peft's alpha_pattern, as the rank comes from rank_pattern)
    assert f"  vision_model.encoder.layers.{layers - 1}.self_attn.{{k_proj,q_proj,v_proj,out_proj}}  r=2 alpha=32" in out
    assert "head: concat" in out and "labels cat, dog" in out
    assert "adapter_model.safetensors" in out and "head.safetensors" in out and "mmpeft.json" in out

    assert main(["inspect", str(tmp_path / "run"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["towers"]["vision"]["lora_modules"] == 4 and report["towers"]["vision"]["trainable"] == trained["vision"]
    assert main(["inspect", str(tmp_path)]) == 2
    assert "is not an mmpeft output folder" in capsys.readouterr().err


def test_layer_patterns_never_claim_modules_that_are_not_there():
    assert layer_patterns(["a.layers.0.q", "a.layers.1.q", "a.layers.1.k"]) == [("a.layers.1.k", 1),
                                                                                 ("a.layers.{0,1}.q", 2)]
    assert layer_patterns(["b.0.conv1", "b.0.conv2", "b.1.conv1", "b.1.conv2"]) == [("b.{0,1}.{conv1,conv2}", 4)]
