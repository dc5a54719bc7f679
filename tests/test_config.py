"""Config loading, overrides and validation messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmpeft import load_config
from mmpeft.config import config_from_dict
from mmpeft.errors import ConfigError


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


@pytest.mark.parametrize("override, key", [
    ("train.max_grad_norm=-1", "train.max_grad_norm"), ("train.early_stopping_patience=0", "train.early_stopping_patience"),
    ("train.early_stopping_patience=-1", "train.early_stopping_patience"), ("train.eval_every=0", "train.eval_every"),
    ("data.eval_batch_size=0", "data.eval_batch_size"), ("data.max_text_length=0", "data.max_text_length"),
    ("train.epochs=2.5", "train.epochs"), ("head.hidden=-5", "head.hidden"), ("model.text.lora.r=2.5", "model.text.lora.r"),
    ("data.num_workers=1.5", "data.num_workers"), ("train.seed=abc", "train.seed"),
    ("data.max_text_length=-1", "data.max_text_length"), ("head.dropout=1.5", "head.dropout"),
    ("train.grad_accum=2.5", "train.grad_accum"), ("train.lr_lora=0", "train.lr_lora"),
    ("train.log_every=true", "train.log_every"), ("model.vision.lora.alpha=nan", "model.vision.lora.alpha"),
])
def test_every_numeric_key_has_its_type_and_range_checked(override, key):
    """Values that used to be accepted and silently ruin a run (or end in a bare traceback) name their key."""
    with pytest.raises(ConfigError, match=re.escape(f"`{key}` must be")):
        load_config(None, [override])


def test_a_yaml_file_whose_top_level_is_a_list_is_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("- train\n- epochs\n")
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))} must hold a mapping of sections"):
        load_config(path)


def test_the_embedded_yaml_spells_out_the_defaults():
    """`mmpeft train`, `mmpeft compare` and the recipes agree on the embedded default: the dataclass defaults are
    recipes/configs/embedded_sentiment.yaml's values."""
    yaml_config = load_config(Path(__file__).parents[1] / "recipes" / "configs" / "embedded_sentiment.yaml")
    assert yaml_config.to_dict() == load_config(None).to_dict()


def test_a_saved_config_that_fails_todays_checks_loads_with_a_warning(caplog):
    saved = load_config(None).to_dict()
    saved["train"]["max_grad_norm"] = -1.0  # accepted by earlier releases
    with pytest.raises(ConfigError):
        config_from_dict(saved)
    with caplog.at_level("WARNING"):
        cfg = config_from_dict(saved, strict=False)
    assert cfg.train.max_grad_norm == -1.0 and "train.max_grad_norm" in caplog.text


def test_overrides_may_come_before_and_after_the_config_option():
    from mmpeft.cli import build_parser, config_from_args, parse_with_overrides

    config = Path(__file__).parents[1] / "recipes" / "configs" / "embedded_sentiment.yaml"
    args = parse_with_overrides(build_parser(), ["train", "train.epochs=3", "--config", str(config), "train.seed=4"])
    cfg = config_from_args(args)
    assert cfg.train.epochs == 3 and cfg.train.seed == 4
    with pytest.raises(SystemExit):
        parse_with_overrides(build_parser(), ["train", "--no-such-option"])


def test_every_config_key_is_in_the_readme_reference():
    """README's config reference cannot drift: each key of every section is named there."""
    import dataclasses


    readme = (Path(__file__).parents[1] / "README.md").read_text()
    reference = readme[readme.index("## Config reference"):]

    def keys(section, prefix):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value) and f.name != "extra":
                yield from keys(value, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    cfg = load_config(None, ["model.quantization.bits=4"])
    missing = []
    for key in keys(cfg, ""):
        head, _, last = key.rpartition(".")
        short = key.replace("model.text.", "model.<tower>.").replace("model.vision.", "model.<tower>.")
        if not any(form in reference for form in (f"`{key}`", f"`{short}`", f"`.{last}`", f"`{short.rpartition('.')[0]}.{last}` ")):
            missing.append(key)
    assert not missing, missing
