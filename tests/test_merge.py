"""`mmpeft merge`: adapters folded into the backbone, a folder stock transformers loads, quantized bases
dequantized first (tight tolerance) and optionally re-quantized (reported), naive 4-bit merges refused."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmpeft import build_classifier, load_adapter, load_backbone, load_config, save_adapter
from mmpeft.cli import main
from mmpeft.export.merge import MergeError, merge, merge_adapter, probe_batch
from mmpeft.testing import perturb_lora

NO_DROPOUT = ["model.text.lora.dropout=0.0", "model.vision.lora.dropout=0.0", "head.dropout=0.0"]




def _saved_run(path, out, *extra):
    """A classifier with non-zero LoRA updates saved the way training saves it (no training needed)."""
    cfg = load_config(None, [f"model.name={path}", *NO_DROPOUT, *extra])
    backbone = load_backbone(cfg.model.name, dtype=cfg.model.dtype, quantization=cfg.model.quantization)
    torch.manual_seed(0)
    model = build_classifier(backbone, cfg, ["negative", "neutral", "positive"])
    perturb_lora(model)
    save_adapter(model, out, cfg, backbone_name=cfg.model.name, backbone_revision=None,
                 fingerprint=backbone.fingerprint)
    model.source, model.config = backbone, cfg  # as load_adapter sets them, for probe_batch
    return model


@pytest.mark.parametrize("family", ["clip", "siglip", "blip"])
def test_qlora_merge_dequantizes_and_matches(tiny_paths, tmp_path, family):
    bnb = pytest.importorskip("bitsandbytes")
    model = _saved_run(tiny_paths[family], tmp_path / "run", "model.quantization={bits: 4}")
    with pytest.raises(MergeError, match=r"Refusing to merge LoRA into quantized weights.*Dequantize first"):
        merge_adapter(model.backbone)

    report = merge(tmp_path / "run", tmp_path / "merged", requantize=family == "clip")
    assert report["max_abs_diff_full_precision"] < 1e-4  # the merge itself, in float32
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text()) == report
    merged = load_adapter(tmp_path / "merged")  # head + labels, backbone recorded as the folder itself
    assert merged.tower_modes == {"text": "frozen", "vision": "frozen"}
    assert merged.label_names == ["negative", "neutral", "positive"]
    if family == "clip":
        assert report["max_abs_diff_requantized"] > report["max_abs_diff_full_precision"]
        layers = [m for m in merged.base.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers, "the re-quantized folder should load in 4-bit"
        config = json.loads((tmp_path / "merged" / "config.json").read_text())
        assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    else:
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.base.modules())


def test_merged_folder_loads_in_stock_transformers(tiny_paths, tmp_path):
    from transformers import CLIPModel, pipeline

    model = _saved_run(tiny_paths["clip"], tmp_path / "run", "model.text.mode=lora", "model.vision.mode=full")
    report = merge(tmp_path / "run", tmp_path / "merged")
    assert report["max_abs_diff_full_precision"] < 1e-5
    stock = CLIPModel.from_pretrained(tmp_path / "merged").eval()
    batch = probe_batch(model, 4)
    model.eval()
    with torch.no_grad():
        out = stock.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        features = getattr(out, "pooler_output", out)  # transformers 5 returns an output object
        expected = model.encode_text(batch["input_ids"], batch["attention_mask"]).pooled
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    classify = pipeline("zero-shot-image-classification", model=str(tmp_path / "merged"))
    scores = classify(Image.new("RGB", (40, 40), (200, 30, 30)), candidate_labels=["cat", "dog"])
    assert {s["label"] for s in scores} == {"cat", "dog"} and abs(sum(s["score"] for s in scores) - 1) < 1e-4
    merged = load_adapter(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch), model(**batch), atol=1e-5, rtol=1e-5)


def test_merge_cli_and_its_refusals(tiny_paths, tmp_path, capsys):
    _saved_run(tiny_paths["clip"], tmp_path / "run")
    assert main(["merge", str(tmp_path / "run"), "--to", str(tmp_path / "merged"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "full precision: largest logit difference" in out and "merged model written" in out
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    assert main(["merge", str(tmp_path / "run"), "--to", str(tmp_path / "merged")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "run"), "--to", str(tmp_path / "again"), "--requantize"]) == 2
    assert "was not trained on a quantized backbone" in capsys.readouterr().err


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_merge_never_deletes_the_run_or_files_it_did_not_write(tiny_paths, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run2"
    _saved_run(tiny_paths["clip"], run)
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "checkpoints" / "step-2" / "state.bin").write_bytes(b"optimizer")
    (run / "metrics.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    before = _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    for to, word in [(run, "is the run folder"), (".", "contains the run folder"),
                     (run / "merged", "lies inside the run folder")]:
        assert main(["merge", "run2", "--to", str(to), "--overwrite"]) == 2
        assert word in capsys.readouterr().err
        assert _files(tmp_path) == before  # nothing deleted, no staging folder left behind

    # a folder mmpeft merge did not write is not replaced, even with --overwrite
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("keep")
    assert main(["merge", "run2", "--to", "other", "--overwrite"]) == 2
    assert "is not a folder `mmpeft merge` wrote" in capsys.readouterr().err
    assert (tmp_path / "other" / "keep.txt").read_text() == "keep"

    # an earlier merge is replaced; a file added to it since makes --overwrite refuse
    assert main(["merge", "run2", "--to", "merged"]) == 0
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert set(report["files"]) == set(_files(tmp_path / "merged")) and "model.safetensors" in report["files"]
    assert main(["merge", "run2", "--to", "merged", "--overwrite", "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["dtype"] == "bfloat16"
    (tmp_path / "merged" / "README.md").write_text("my notes")
    capsys.readouterr()
    assert main(["merge", "run2", "--to", "merged", "--overwrite"]) == 2
    assert "holds 1 file(s) `mmpeft merge` did not write (README.md)" in capsys.readouterr().err
    assert (tmp_path / "merged" / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "notes.txt", "other", "run2"]
    assert _files(run) == {k.removeprefix("run2/"): v for k, v in before.items() if k.startswith("run2/")}
