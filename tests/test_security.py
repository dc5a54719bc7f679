"""Untrusted input: pickle weight files, Hub tokens, manifest paths that leave the data root."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmpeft import BackboneError, build_classifier, load_adapter, load_backbone, load_config, save_adapter
from mmpeft.data import DataError, read_split

SECRET = "hf_THISisAfakeTOKENthatMUSTneverBEwritten"


@pytest.fixture(scope="module")
def pickle_clip(tiny_paths, tmp_path_factory) -> Path:
    """The tiny CLIP with its weights as `pytorch_model.bin` (a torch.save'd state dict) and no safetensors."""
    folder = tmp_path_factory.mktemp("pickle") / "clip-bin"
    shutil.copytree(tiny_paths["clip"], folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_are_refused_without_the_flag(pickle_clip, tiny_paths):
    with pytest.raises(BackboneError) as info:
        load_backbone(str(pickle_clip))
    msg = str(info.value)
    assert "only pickle weights (pytorch_model.bin)" in msg and "model.trust_pickle_weights=true" in msg
    assert "weights_only=True" in msg

    trusted = load_backbone(str(pickle_clip), trust_pickle_weights=True)
    reference = load_backbone(str(tiny_paths["clip"]))
    assert trusted.fingerprint == reference.fingerprint
    torch.testing.assert_close(trusted.model.state_dict(), reference.model.state_dict(), rtol=0, atol=0)


def test_config_json_cannot_point_at_a_pickle_file(tiny_paths, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(tiny_paths["clip"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(BackboneError, match=r"names a pickle weights file \(adapter_model.bin\).*trust_pickle"):
        load_backbone(str(folder))


class _RunsCode:
    """Unpickling this calls os.mkdir: what a malicious weights file does, made harmless."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_trusted_pickle_is_read_with_weights_only(pickle_clip, tmp_path):
    folder, marker = tmp_path / "evil", tmp_path / "code-ran"
    shutil.copytree(pickle_clip, folder)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(BackboneError, match=r"holds more than tensors.*weights_only=True.*posix.mkdir"):
        load_backbone(str(folder), trust_pickle_weights=True)
    assert not marker.exists()


def test_saved_folder_never_holds_the_hub_token_nor_grants_pickle_trust(pickle_clip, tmp_path, monkeypatch,
                                                                          capsys, caplog):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    cfg = load_config(None, [f"model.name={pickle_clip}", "model.trust_pickle_weights=true", "head.hidden=8"])
    backbone = load_backbone(cfg.model.name, trust_pickle_weights=True)
    model = build_classifier(backbone, cfg, ["cat", "dog"])
    out = save_adapter(model, tmp_path / "out", cfg, backbone_name=backbone.name,
                       backbone_revision=backbone.revision, fingerprint=backbone.fingerprint)
    assert SECRET not in json.dumps(cfg.to_dict())
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"mmpeft.json", "adapter_model.safetensors", "head.safetensors"}
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path

    # The saved config records the flag, but trusting pickle files is the loading user's call, not the folder's.
    assert json.loads((out / "mmpeft.json").read_text())["config"]["model"]["trust_pickle_weights"] is True
    with pytest.raises(BackboneError, match="trust_pickle_weights"):
        load_adapter(out)
    assert load_adapter(out, trust_pickle_weights=True).label_names == ["cat", "dog"]
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text


# ---------------------------------------------------------------- manifest paths and the data root

def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """tmp/data/ holds the manifest's folder contents; tmp/secret.png lies outside it."""
    _image(tmp_path / "data" / "imgs" / "ok.png")
    _image(tmp_path / "secret.png")
    (tmp_path / "data" / "imgs" / "inside-link.png").symlink_to(tmp_path / "data" / "imgs" / "ok.png")
    (tmp_path / "data" / "imgs" / "outside-link.png").symlink_to(tmp_path / "secret.png")
    (tmp_path / "data" / "escape").symlink_to(tmp_path, target_is_directory=True)
    return tmp_path / "data"


ESCAPES = {
    "dotdot": "../secret.png",
    "dotdot_inside_then_out": "imgs/../../secret.png",
    "absolute": "{tmp}/secret.png",
    "symlinked_file": "imgs/outside-link.png",
    "symlinked_folder": "escape/secret.png",
}


@pytest.mark.parametrize("kind", sorted(ESCAPES))
def test_paths_leaving_the_data_root_are_refused(root: Path, kind: str):
    bad = ESCAPES[kind].format(tmp=root.parent)
    rows = [{"image": "imgs/ok.png", "text": "fine", "label": "a"},
            {"image": "imgs/inside-link.png", "text": "a link that stays inside", "label": "b"},
            {"image": bad, "text": "sneaky", "label": "a"}]
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as info:
        read_split(manifest)
    msg = str(info.value)
    assert f"{manifest} row 3: image path '{bad}' resolves to {root.parent / 'secret.png'}" in msg
    assert f"outside the data root {os.path.realpath(root)}" in msg and "data.allow_outside_root=true" in msg
    assert "row 1" not in msg and "row 2" not in msg

    skipped = read_split(manifest, skip_bad_rows=True)
    assert [ex.text for ex in skipped.examples] == ["fine", "a link that stays inside"]
    assert [row for row, _ in skipped.skipped] == [3]
    allowed = read_split(manifest, allow_outside_root=True)
    assert [ex.text for ex in allowed.examples] == ["fine", "a link that stays inside", "sneaky"]


def test_root_is_the_resolved_manifest_folder(tmp_path: Path):
    """A manifest reached through a symlinked folder still sees its own images as inside."""
    _image(tmp_path / "real" / "imgs" / "x.png")
    (tmp_path / "real" / "m.csv").write_text("image,text,label\nimgs/x.png,hi,a\n")
    (tmp_path / "via").symlink_to(tmp_path / "real", target_is_directory=True)
    assert [ex.text for ex in read_split(tmp_path / "via" / "m.csv").examples] == ["hi"]


def test_datasets_folder_paths_are_checked_too(root: Path):
    """An Image cell holding only a path (no bytes) is a path relative to the datasets folder, checked like any."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa

    ds = datasets.Dataset.from_dict({"image": [str(root / "imgs" / "ok.png")] * 2, "text": ["sneaky", "inline"],
                                     "label": ["a", "b"]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(root / "ds"))
    # save_to_disk embeds the bytes; take them out of row 1 and point it outside, as a hand-made file could.
    arrow = next((root / "ds").glob("*.arrow"))
    with pa.ipc.open_stream(arrow.read_bytes()) as reader:  # in memory: the file is rewritten below
        table = reader.read_all()
    cells = table.column("image").to_pylist()
    cells[0] = {"bytes": None, "path": "../imgs/ok.png"}
    table = table.set_column(0, table.schema.field(0), pa.array(cells, type=table.schema.field(0).type))
    with pa.ipc.new_stream(arrow, table.schema) as writer:
        writer.write_table(table)

    msg = str(pytest.raises(DataError, read_split, root / "ds").value)
    assert "row 1: image path '../imgs/ok.png'" in msg and "data.allow_outside_root=true" in msg
    assert "row 2" not in msg
    allowed = read_split(root / "ds", allow_outside_root=True).examples
    assert allowed[0].image == str(root / "imgs" / "ok.png") and allowed[1].load_image is not None
