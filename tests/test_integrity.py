"""Loading a saved run safely and predicting with it: damaged weight files, recorded SHA-256, decompression bombs,
the saved adapter config winning over today's presets, label-named predictions, batch prediction, column names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cat_dog_rows, train_quick_run, write_manifest
from safetensors.torch import load_file, save_file

from mmpeft import Predictions, build_classifier, load_adapter, load_backbone, load_config, predict
from mmpeft.cli import main
from mmpeft.errors import AdapterError
from mmpeft.export.hub import HubConfig
from mmpeft.models.adapters import lora_module_names
from mmpeft.models.integrity import sha256_of

FIXTURE = Path(__file__).parent / "fixtures" / "run-v0.1.0"


@pytest.fixture(scope="module")
def run(tiny_paths, tmp_path_factory) -> dict:
    out, data = train_quick_run(tiny_paths["clip"], tmp_path_factory.mktemp("integrity"), cat_dog_rows(8))
    images = [str(data.parent / f"img_train_{i}.png") for i in range(4)]
    texts = [r["text"] for r in cat_dog_rows(4)]
    return {"out": out, "data": data, "images": images, "texts": texts,
            "probs": predict(load_adapter(out), images, texts).probabilities}


@pytest.fixture
def copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run["out"], tmp_path / "copy"))


def test_save_records_weight_hashes_and_writes_no_peft_template_card(run):
    record = json.loads((run["out"] / "mmpeft.json").read_text())
    assert record["files"] == {name: sha256_of(run["out"] / name)
                               for name in ("adapter_model.safetensors", "head.safetensors")}
    assert record["hardware"]["cpu_count"] >= 1
    assert not (run["out"] / "README.md").exists()


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "head.safetensors"])
def test_truncated_weight_file_is_refused_by_name(copy, run, name, capsys):
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[:5])  # a truncated header
    with pytest.raises(AdapterError, match=f"{name} is damaged or truncated"):
        load_adapter(copy, verify_hashes=False)
    assert main(["predict", "--adapter", str(copy), "--image", run["images"][0], "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert str(copy / name) in err and "Traceback" not in err
    assert main(["eval", "--adapter", str(copy), "--data", str(run["data"]), "--num-workers", "0"]) == 2
    assert f"{name}" in capsys.readouterr().err


def test_overwritten_weights_are_refused_unless_accepted(copy, run, capsys):
    path = copy / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, path)  # a valid file, NaN values
    with pytest.raises(AdapterError, match="SHA-256 differs") as err:
        load_adapter(copy)
    assert "verify_hashes=False" in str(err.value) and "--no-verify" in str(err.value)
    assert main(["predict", "--adapter", str(copy), "--image", run["images"][0], "--text", "x"]) == 2
    assert "adapter_model.safetensors" in capsys.readouterr().err
    accepted = predict(load_adapter(copy, verify_hashes=False), run["images"][:1], run["texts"][:1])
    assert torch.isnan(accepted.probabilities).all()  # what the hash check keeps from reaching a user


def test_run_saved_before_hashes_loads_as_before(tmp_path):
    folder = Path(shutil.copytree(FIXTURE, tmp_path / "old"))
    assert "files" not in json.loads((folder / "mmpeft.json").read_text())
    model = load_adapter(folder)
    saved = json.loads((folder / "adapter_config.json").read_text())
    import re

    names = lora_module_names(model.backbone)
    assert names and all(re.fullmatch(saved["target_modules"], n) for n in names)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    result = predict(model, [str(image)], ["a red square"])
    assert torch.isfinite(result.probabilities).all() and result[0]["label"] in model.label_names


def test_load_uses_the_saved_adapter_config_not_todays_presets(run, monkeypatch):
    """An adapter saved when the presets targeted other modules loads exactly (issue 10.7)."""
    model = load_adapter(run["out"])
    family = model.family
    expected_names = lora_module_names(model.backbone)
    narrower = family.lora_targets["text"].replace("(q|k|v|out)", "q")
    assert narrower != family.lora_targets["text"]
    monkeypatch.setitem(family.lora_targets, "text", narrower)  # today's preset: fewer text modules
    reloaded = load_adapter(run["out"])
    assert lora_module_names(reloaded.backbone) == expected_names
    torch.testing.assert_close(predict(reloaded, run["images"], run["texts"]).probabilities, run["probs"],
                               rtol=0, atol=0)


def test_predict_names_labels_and_works_on_a_built_classifier(tiny_paths):
    cfg = load_config(None, [f"model.name={tiny_paths['clip']}", "head.hidden=16"])
    model = build_classifier(load_backbone(str(tiny_paths["clip"])), cfg, ["cat", "dog", "bird"])
    from PIL import Image

    found = predict(model, [Image.new("RGB", (32, 32), (1, 2, 3))] * 2, ["a cat", "a dog"])
    assert isinstance(found, Predictions) and found.probabilities.shape == (2, 3)
    assert set(found[0]["probabilities"]) == {"cat", "dog", "bird"}
    assert found[0]["label"] == found.labels[0] == max(found[0]["probabilities"], key=found[0]["probabilities"].get)
    torch.testing.assert_close(found.probabilities.sum(-1), torch.ones(2))


def test_decompression_bomb_is_one_message(run, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 32x32 test image is now past twice the limit
    assert main(["predict", "--adapter", str(run["out"]), "--image", run["images"][0], "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert "decompression bomb" in err and run["images"][0] in err and "Traceback" not in err


def test_batch_predict_writes_one_line_per_row(run, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", "--adapter", str(run["out"]), "--data", str(run["data"]), "--output", str(out),
                 "--num-workers", "0", "--batch-size", "3"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["row"] for line in lines] == list(range(1, 9))
    single = predict(load_adapter(run["out"]), run["images"], run["texts"])
    for line, expected in zip(lines, single):
        assert line["label"] == expected["label"] and line["text"].startswith("a photo of a")
        assert line["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
    assert main(["predict", "--adapter", str(run["out"]), "--data", str(run["data"]), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err  # an existing file is never replaced unasked


def test_batch_predict_reports_bad_rows_like_training(run, tmp_path, capsys):
    data = write_manifest(tmp_path / "d", cat_dog_rows(4), name="posts.jsonl")
    (tmp_path / "d" / "img_posts_2.png").write_bytes(b"not a png")
    out = tmp_path / "p.jsonl"
    args = ["predict", "--adapter", str(run["out"]), "--data", str(data), "--output", str(out), "--num-workers", "0"]
    assert main(args) == 2
    assert "row 3" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--skip-bad-rows"]) == 0
    assert "skipped" in capsys.readouterr().err
    assert [json.loads(line)["row"] for line in out.read_text().splitlines()] == [1, 2, 4]


def test_eval_and_predict_read_other_column_names(run, tmp_path, capsys):
    lines = [json.loads(line) for line in run["data"].read_text().splitlines()]
    renamed = run["data"].parent / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"img": r["image"], "caption": r["text"],
                                           "y": r["label"]}) + "\n" for r in lines))
    base = ["eval", "--adapter", str(run["out"]), "--data", str(renamed), "--num-workers", "0",
            "--output", str(tmp_path / "m.json")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "--image-column" in err and "data.image_column" not in err
    columns = ["--image-column", "img", "--text-column", "caption", "--label-column", "y"]
    assert main([*base, *columns]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["num_samples"] == 8
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--adapter", str(run["out"]), "--data", str(renamed), "--output", str(out),
                 "--num-workers", "0", *columns[:4]]) == 0
    assert len(out.read_text().splitlines()) == 8


def test_hub_config_problems_name_their_keys():
    assert HubConfig().problems("hub") == []
    assert HubConfig(push=True, repo_id="alice/x").problems("hub") == []
    problems = HubConfig(push=True, private="yes", base_model_id="./local").problems("hub")
    assert any("`hub.repo_id`" in p for p in problems)
    assert any("`hub.private`" in p for p in problems)
    assert any("`hub.base_model_id`" in p for p in problems)
    assert any("`hub.repo_id`" in p for p in HubConfig(repo_id="no-slash").problems("hub"))


def test_run_from_a_comparison_records_it_and_the_card_shows_it(run, tmp_path, monkeypatch):
    from PIL import Image

    from mmpeft import save_adapter
    from mmpeft.export.card import build_card
    from mmpeft.export.hub import upload_plan

    compare = tmp_path / "compare"
    compare.mkdir()
    (compare / "results.md").write_text("| config | test macro-F1 |\n|---|---:|\n| lora-both | 0.91 |\n")
    Image.new("RGB", (8, 8)).save(compare / "macro_f1.png")
    monkeypatch.setenv("MMPEFT_COMPARISON", json.dumps({"config": "lora-both", "shots": None, "seed": 0,
                                                        "folder": str(compare)}))
    model = load_adapter(run["out"])
    record = json.loads((run["out"] / "mmpeft.json").read_text())
    out = save_adapter(model, tmp_path / "saved", model.config, backbone_name=record["backbone"]["name"],
                       backbone_revision=None, fingerprint=record["backbone"]["fingerprint"])
    shutil.copy(run["out"] / "metrics.json", out / "metrics.json")
    saved = json.loads((out / "mmpeft.json").read_text())
    assert saved["comparison"]["config"] == "lora-both" and saved["comparison"]["folder"] == str(compare)
    card = str(build_card(out, base_model_id="alice/base"))
    assert "| lora-both | 0.91 |" in card and "](comparison/macro_f1.png)" in card
    plan = upload_plan(out, saved, base_model_id="alice/base", base_revision=None, repo_id="alice/x",
                       include_checkpoints=False, include_logs=False)
    assert plan["comparison/macro_f1.png"] == compare / "macro_f1.png"
    assert str(compare) not in plan["mmpeft.json"].decode()  # the uploaded record keeps no local path


def test_card_replaces_peft_template_but_not_a_users_readme(tmp_path, capsys):
    folder = Path(shutil.copytree(FIXTURE, tmp_path / "old"))
    assert "[More Information Needed]" in (folder / "README.md").read_text()  # peft's template, from v0.1.0
    args = ["card", str(folder), "--base-model-id", "alice/tiny-clip"]
    assert main(args) == 0
    card = (folder / "README.md").read_text()
    assert "More Information Needed" not in card and "base_model_relation: adapter" in card
    assert main(args) == 0  # refreshing our own card
    (folder / "README.md").write_text("# my notes\n")
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert (folder / "README.md").read_text() == "# my notes\n"
    assert main([*args, "--overwrite"]) == 0
