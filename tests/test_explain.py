"""mmpeft.explain on saved runs loaded through load_adapter: saliency per family, modality contribution, calibration,
the report and the command; and (point 4 of the issue) the embedded sentiment rule recovered after a short fine-tune."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmpeft import build_classifier, load_adapter, load_backbone, load_config, save_adapter
from mmpeft.cli import main
from mmpeft.explain import explain_run, load_split, modality_contribution, saliency_batch, shapley_example
from mmpeft.explain.calibration import gallery, reliability
from mmpeft.explain.contribution import masked_token_id, text_players
from mmpeft.explain.hooks import TowerRecorder, explaining, tower_root
from mmpeft.explain.saliency import relevance_matrix, rollout_matrix
from mmpeft.explain.split import encode_split

LABELS = ["cat", "dog"]


def saved_run(name, out, *extra):
    """A classifier with non-zero LoRA updates, saved and loaded back the way users load a run (frozen)."""
    cfg = load_config(None, [f"model.name={name}", "model.text.lora.dropout=0", "model.vision.lora.dropout=0",
                             "head.dropout=0", *extra])
    backbone = load_backbone(cfg.model.name, dtype=cfg.model.dtype, quantization=cfg.model.quantization)
    torch.manual_seed(0)
    model = build_classifier(backbone, cfg, LABELS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    save_adapter(model, out, cfg, backbone_name=backbone.name, backbone_revision=None,
                 fingerprint=backbone.fingerprint)
    return load_adapter(out)


def first_batch(model, manifest, n=4):
    split = load_split(model, manifest, batch_size=n)
    return split, next(iter(split.loader))


@pytest.fixture
def clip_model(tiny_paths, tmp_path):
    return saved_run(tiny_paths["clip"], tmp_path / "run")


def test_relevance_and_rollout_follow_their_definitions():
    torch.manual_seed(0)
    maps = []
    for _ in range(2):
        a = torch.softmax(torch.randn(1, 2, 3, 3), -1).requires_grad_()
        a.grad = torch.randn(1, 2, 3, 3)
        maps.append(a)
    expected = torch.eye(3)
    for a in maps:
        expected = expected + (a.grad * a.detach()).clamp_min(0).mean(1)[0] @ expected
    torch.testing.assert_close(relevance_matrix(maps)[0], expected)
    rolled = torch.eye(3)
    for a in maps:
        step = 0.5 * (a.detach().mean(1)[0] + torch.eye(3))
        rolled = step / step.sum(-1, keepdim=True) @ rolled
    torch.testing.assert_close(rollout_matrix(maps)[0], rolled)


def test_sdpa_gives_no_maps_eager_does_and_is_restored(clip_model, sixteen_examples):
    _, batch = first_batch(clip_model, sixteen_examples)
    pixels = batch["pixel_values"]
    with TowerRecorder(tower_root(clip_model, "vision")) as plain, torch.no_grad():
        clip_model.image_features(pixels)
    assert plain.self_attentions() == []  # SDPA: no weights
    before = clip_model.base.config._attn_implementation
    with explaining(clip_model), TowerRecorder(tower_root(clip_model, "vision")) as rec:
        clip_model.image_features(pixels.clone().requires_grad_())
    assert len(rec.self_attentions()) == 2 and all(a.requires_grad for a in rec.self_attentions())
    assert clip_model.base.config._attn_implementation == before
    assert not clip_model.all_towers_with_grad


def test_frozen_towers_get_gradients_only_inside_the_context(tiny_paths, tmp_path, sixteen_examples):
    model = saved_run(tiny_paths["clip"], tmp_path / "run", "model.vision.mode=frozen")
    _, batch = first_batch(model, sixteen_examples)
    pixels = batch["pixel_values"].clone().requires_grad_()
    assert not model.image_features(pixels).pooled.requires_grad
    with model.gradients_everywhere():
        out = model.image_features(pixels).pooled
    out.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["clip", "siglip", "blip", "open_clip", "dual-vit", "dual-torchvision"])
def test_saliency_for_every_family(family, tiny_paths, tiny_open_clip, tiny_dual, tmp_path, sixteen_examples):
    name = {"open_clip": tiny_open_clip, "dual-vit": tiny_dual.get("vit"),
            "dual-torchvision": tiny_dual.get("torchvision")}.get(family) or tiny_paths[family]
    model = saved_run(name, tmp_path / "run")
    _, batch = first_batch(model, sixteen_examples)
    with torch.no_grad():
        logits = model(**batch)
    out = saliency_batch(model, batch)
    assert [s.target for s in out] == logits.argmax(-1).tolist()
    cnn = family == "dual-torchvision"
    for s in out:
        expected = {"gradcam", "gradxinput"} if cnn else {"relevance", "rollout", "gradxinput"}
        assert set(s.image) == expected, s.skipped
        for values in s.image.values():
            assert np.isfinite(values).all() and values.max() > 0
        assert ("image/relevance" in s.skipped) == cnn and "image/gradcam" in s.skipped or cnn
        assert {"gradxinput", "relevance", "rollout"} <= set(s.text)
        assert len(s.text["relevance"]) == len(s.tokens) == batch["input_ids"].shape[1]
        assert np.abs(s.text["gradxinput"]).sum() > 0
    if not cnn:
        side = out[0].image["relevance"].shape
        assert side[0] == side[1] and side[0] > 1


def test_multihead_attention_hook_keeps_outputs_and_gives_gradients(tiny_open_clip, tmp_path, sixteen_examples):
    """open_clip calls nn.MultiheadAttention with need_weights=False; asking for per-head weights changes no output
    and the weights carry the gradient."""
    model = saved_run(tiny_open_clip, tmp_path / "run")
    _, batch = first_batch(model, sixteen_examples)
    with torch.no_grad():
        plain = model(**batch)
    with explaining(model), TowerRecorder(tower_root(model, "vision")) as rec:
        pixels = batch["pixel_values"].clone().requires_grad_()
        image = model.image_features(pixels)
        logits = model.fuse(model.text_features(batch["input_ids"], batch["attention_mask"]), image)
        logits[:, 0].sum().backward()
    rec.gradients_to_views()
    torch.testing.assert_close(logits.detach(), plain, rtol=1e-5, atol=1e-5)
    maps = rec.self_attentions()
    assert len(maps) == 2 and maps[0].shape[1] == 4  # per-head weights
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in maps)


def test_siglip_pooling_head_and_cross_attention_head_maps(tiny_paths, tmp_path, sixteen_examples):
    model = saved_run(tiny_paths["siglip"], tmp_path / "run", "head.type=cross_attention")
    _, batch = first_batch(model, sixteen_examples)
    with explaining(model), TowerRecorder(tower_root(model, "vision")) as rec, TowerRecorder(model.head) as head:
        pixels = batch["pixel_values"].clone().requires_grad_()
        logits = model.fuse(model.text_features(batch["input_ids"], batch["attention_mask"]),
                            model.image_features(pixels))
        logits[:, 0].sum().backward()
    rec.gradients_to_views()
    head.gradients_to_views()
    pools = rec.pooling_attentions()
    assert len(pools) == 1 and pools[0].shape[-2] == 1 and pools[0].grad.abs().sum() > 0
    assert len(head.attentions) == 1 and head.attentions[0].grad.abs().sum() > 0
    out = saliency_batch(model, batch)
    assert out[0].image["relevance"].shape == (4, 4)  # 32 px / 8 px patches, no class token


def test_shapley_is_efficient_and_masks_text_that_the_tower_ignores(tiny_paths, tmp_path, sixteen_examples):
    model = saved_run(tiny_paths["siglip"], tmp_path / "run")
    assert masked_token_id(model) == model.source.tokenizer.pad_token_id  # SigLIP: the mask alone does nothing
    _, batch = first_batch(model, sixteen_examples)
    ids, mask, pixels = batch["input_ids"][0], batch["attention_mask"][0], batch["pixel_values"][0]
    result = shapley_example(model, ids, mask, pixels, permutations=3, rng=np.random.default_rng(0))
    assert result["n_text"] == len(text_players(model, ids, mask)) >= 7  # "a photo of a cat number 0", no BOS/EOS
    assert result["n_image"] == result["grid"] ** 2 == round(np.sqrt(result["n_text"])) ** 2
    total = sum(result["phi_text"]) + sum(result["phi_image"])
    assert total == pytest.approx(result["full_logit"] - result["empty_logit"], abs=1e-3)  # efficiency
    assert np.abs(result["phi_text"]).sum() > 0 and 0 < result["t_shap"] < 1


def test_clip_text_masking_keeps_the_pooled_position(clip_model):
    tokenizer = clip_model.source.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert masked_token_id(clip_model) is None  # replacing by pad (= EOS) would move CLIP's pooling


def test_unread_modality_contributes_nothing(tiny_paths, tmp_path, sixteen_examples):
    model = saved_run(tiny_paths["clip"], tmp_path / "run", "head.type=image_only", "model.text.mode=frozen")
    result = modality_contribution(model, sixteen_examples, permutations=3, shapley_permutations=2,
                                   shapley_examples=3, progress=False)
    overall = result["permutation"]["subsets"]["overall"]
    assert overall["text"]["changed_mean"] == 0.0 and overall["text"]["accuracy_drop"] == 0.0
    assert result["shapley"]["subsets"]["overall"]["t_shap"] == 0.0
    assert result["gates"] is None


def test_gated_head_reports_its_gates(tiny_paths, tmp_path, sixteen_examples):
    model = saved_run(tiny_paths["clip"], tmp_path / "run", "head.type=gated")
    split = load_split(model, sixteen_examples)
    encoded = encode_split(model, split, progress=False)
    result = modality_contribution(model, split, encoded, permutations=2, shapley_permutations=0, progress=False)
    gates = result["gates"]["overall"]
    assert gates["text"] + gates["image"] == pytest.approx(1.0)
    assert gates["text"] == pytest.approx(float(encoded.gates[:, 0].mean()))


def test_reliability_and_gallery():
    confidence = np.array([0.95, 0.95, 0.55, 0.45])
    correct = np.array([True, False, True, True])
    rel = reliability(confidence, correct, bins=10)
    assert rel["ece"] == pytest.approx(0.5 * abs(0.5 - 0.95) + 0.25 * abs(1 - 0.55) + 0.25 * abs(1 - 0.45))
    logits = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.1, 0.0]])
    chosen = gallery(logits, np.array([0, 0, 1, 1]), 4)  # one error (the last row)
    assert chosen == {"confident_correct": [0, 1], "confident_wrong": [3], "least_confident_correct": [2]}


def test_quantized_backbone_gives_gradients(tiny_paths, tmp_path, sixteen_examples):
    pytest.importorskip("bitsandbytes")
    model = saved_run(tiny_paths["clip"], tmp_path / "run", "model.quantization={bits: 4}")
    _, batch = first_batch(model, sixteen_examples)
    out = saliency_batch(model, batch)
    assert out[0].image["relevance"].max() > 0 and np.abs(out[0].text["gradxinput"]).sum() > 0


def test_explain_command_writes_the_report(clip_model, tmp_path, sixteen_examples, capsys):
    run = tmp_path / "run"
    report = tmp_path / "report"
    code = main(["explain", "--adapter", str(run), "--data", str(sixteen_examples), "--out", str(report),
                 "--examples", "4", "--permutations", "2", "--shapley-permutations", "2", "--shapley-examples", "4",
                 "--rows", "3", "--no-progress"])
    assert code == 0
    result = json.loads((report / "explain.json").read_text())
    assert result["examples"] == 16 and set(result["sections"]) == {"contribution", "saliency", "calibration"}
    for name in result["figures"].values():
        assert (report / name).stat().st_size > 10_000
    assert "3" in result["saliency"]["examples"] and result["saliency"]["selection"]["requested"] == [2]
    text = (report / "report.md").read_text()
    assert "## Modality contribution" in text and "T-SHAP" in text and "Expected calibration error" in text
    assert main(["explain", "--adapter", str(run), "--data", str(sixteen_examples), "--out", str(report)]) == 2
    assert "already holds a report" in capsys.readouterr().err
    assert main(["explain", "--adapter", str(run), "--data", str(sixteen_examples), "--methods", "shap"]) == 2
    assert "expected 'all' or a comma list" in capsys.readouterr().err
    assert main(["explain", "--adapter", str(run), "--data", str(sixteen_examples), "--out", str(tmp_path / "r2"),
                 "--rows", "99"]) == 2
    assert "no such rows" in capsys.readouterr().err
    assert main(["explain", "--adapter", str(run), "--data", str(sixteen_examples), "--permutations", "0",
                 "--shapley-examples", "0"]) == 2
    err = capsys.readouterr().err
    assert "--permutations must be >= 1, got 0" in err and "--shapley-examples must be >= 1, got 0" in err


def test_rule_of_the_embedded_task_is_recovered(tmp_path):
    """After a short fine-tune of the shipped tiny CLIP, by permutation: the image dominates on image-decided examples
    and the text on text-decided ones. By Shapley shares (predicted-class logit, mean-pixel masking) the image share
    dominates on image-decided examples and the text share is higher on text-decided ones; it hovers at 0.5 there
    (0.43-0.51 by score, baseline and sample: the rule is an AND that Shapley splits), so its dominance is not
    asserted (docs/explain.md has the numbers). `both` is shown only."""
    import mmpeft
    from mmpeft.world import write_sentiment

    paths = write_sentiment(tmp_path / "data", seed=0, sizes={"train": 480, "val": 30, "test": 150})
    cfg = mmpeft.load_config("recipes/configs/embedded_sentiment.yaml", [
        "train.max_steps=45", "train.progress=false", "train.tracker=null", "data.num_workers=0",
        f"data.train={paths['train']}", f"data.eval={paths['val']}", f"data.test={paths['test']}",
        f"train.output_dir={tmp_path / 'run'}"])
    mmpeft.train(cfg)
    model = load_adapter(tmp_path / "run")
    result = explain_run(model, str(paths["test"]), tmp_path / "explain", methods="contribution", permutations=5,
                         shapley_permutations=4, shapley_examples=60, progress=False)
    perm = result["contribution"]["permutation"]["subsets"]
    shap = result["contribution"]["shapley"]["subsets"]
    image, text = perm["decided_by=image"], perm["decided_by=text"]
    assert image["image"]["changed_mean"] > image["text"]["changed_mean"] + 0.3
    assert text["text"]["changed_mean"] > text["image"]["changed_mean"] + 0.2
    assert shap["decided_by=image"]["t_shap"] < 0.45
    assert shap["decided_by=text"]["t_shap"] > shap["decided_by=image"]["t_shap"] + 0.05
    assert "decided_by=both" in (tmp_path / "explain" / "report.md").read_text()
