"""Config loading, overrides and validation messages."""

from __future__ import annotations

import pytest

from mmpeft import load_config


def test_defaults_are_the_embedded_run():
    cfg = load_config()
    assert cfg.model.name == "tiny-clip" and cfg.data.train is None
    assert cfg.model.text.mode == cfg.model.vision.mode == "lora"


def test_overrides_parse_yaml_values_the_way_users_write_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n  lr_lora: 1e-3\nmodel:\n  text: {mode: frozen}\n")
    cfg = load_config(path, ["train.epochs=7", "train.overwrite=true", "model.vision.lora.r=4",
                             "train.max_steps=null", "model.text.lora.extra={use_rslora: true}"])
    assert cfg.train.mixed_precision == "no"  # YAML 1.1 would read `no` as False
    assert cfg.train.lr_lora == pytest.approx(1e-3) and isinstance(cfg.train.lr_lora, float)
    assert cfg.train.epochs == 7 and cfg.train.overwrite is True and cfg.train.max_steps is None
    assert cfg.model.text.mode == "frozen" and cfg.model.vision.lora.r == 4
    assert cfg.model.text.lora.extra == {"use_rslora": True}


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"train\.epohcs.*valid keys here: .*'epochs'"):
        load_config(None, ["train.epohcs=3"])
    with pytest.raises(ValueError, match=r"model\.text\.lora\.rank.*'r'"):
        load_config(None, ["model.text.lora.rank=3"])


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as err:
        load_config(None, ["model.text.mode=sideways", "head.type=bilinear", "data.batch_size=0",
                           "train.warmup_ratio=1.5"])
    message = str(err.value)
    for key in ("model.text.mode", "head.type", "data.batch_size", "train.warmup_ratio"):
        assert key in message
    assert "'sideways'" in message and "['frozen', 'lora', 'full']" in message


def test_unimodal_head_refuses_a_trainable_unused_tower():
    with pytest.raises(ValueError, match=r"never runs the vision tower.*model\.vision\.mode=frozen"):
        load_config(None, ["head.type=text_only"])
    assert load_config(None, ["head.type=text_only", "model.vision.mode=frozen"]).head.type == "text_only"


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ValueError, match="must be a mapping"):
        load_config(None, ["train=3"])
