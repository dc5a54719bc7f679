"""Tests for the data layer: manifest validation, datasets, collation and augmentation."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmpeft.data import (
    Collator,
    DataError,
    MultimodalDataset,
    Split,
    TextEncoding,
    class_counts,
    encode_texts,
    label_names_from,
    read_split,
)

ROWS = [("a.jpg", "a sunny day", "pos", (250, 200, 40)),
        ("b.png", "so gloomy", "neg", (40, 50, 90)),
        ("c.jpg", "fine weather", "pos", (230, 220, 120))]


def save_image(path: Path, color=(200, 100, 50), size=(16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A folder with three images and the same split as CSV and JSONL."""
    for name, _, _, color in ROWS:
        save_image(tmp_path / "imgs" / name, color)
    write_csv(tmp_path / "train.csv", ["image", "text", "label"], [[f"imgs/{n}", t, lab] for n, t, lab, _ in ROWS])
    write_jsonl(tmp_path / "train.jsonl", [{"image": f"imgs/{n}", "text": t, "label": lab} for n, t, lab, _ in ROWS])
    return tmp_path


def error_of(path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_split(path, **kwargs)
    return str(info.value)


def key(split: Split) -> list[tuple]:
    return [(ex.text, ex.label, ex.row) for ex in split.examples]


def test_csv_and_jsonl_agree_and_resolve_relative_to_manifest(good: Path, monkeypatch):
    monkeypatch.chdir(good / "imgs")  # the working directory must not matter
    a, b = read_split(good / "train.csv"), read_split(good / "train.jsonl")
    assert [(ex.text, ex.label) for ex in a.examples] == [(t, lab) for _, t, lab, _ in ROWS]
    assert [ex.row for ex in a.examples] == [2, 3, 4] and [ex.row for ex in b.examples] == [1, 2, 3]
    assert [ex.image for ex in a.examples] == [ex.image for ex in b.examples]
    assert a.examples[0].image == str(good / "imgs" / "a.jpg") and os.path.isabs(a.examples[0].image)
    assert a.skipped == [] and a.source == str(good / "train.csv")


def test_absolute_paths_and_int_labels(tmp_path: Path):
    img = save_image(tmp_path / "elsewhere" / "x.png")
    (tmp_path / "m").mkdir()
    manifest = write_jsonl(tmp_path / "m" / "s.jsonl", [{"image": str(img), "text": "hi", "label": 3}])
    split = read_split(manifest, allow_outside_root=True)  # outside the manifest's folder: refused by default
    assert split.examples[0].image == str(img) and split.examples[0].label == "3"


def test_datasets_folder_path_column_and_image_feature(good: Path):
    datasets = pytest.importorskip("datasets")
    texts, labels = [t for _, t, _, _ in ROWS], [lab for _, _, lab, _ in ROWS]
    paths_ds = datasets.Dataset.from_dict({"image": [f"imgs/{n}" for n, *_ in ROWS], "text": texts, "label": labels})
    paths_ds = paths_ds.class_encode_column("label")  # a ClassLabel column must come back as label names
    paths_ds.save_to_disk(str(good / "paths_ds"))
    for name, *_ in ROWS:  # path strings in a datasets folder are relative to that folder
        save_image(good / "paths_ds" / "imgs" / name, ROWS[[r[0] for r in ROWS].index(name)][3])
    inline = datasets.Dataset.from_dict({"image": [str(good / "imgs" / n) for n, *_ in ROWS], "text": texts,
                                         "label": labels}).cast_column("image", datasets.Image())
    inline.save_to_disk(str(good / "inline_ds"))

    ref = read_split(good / "train.jsonl")
    by_path, by_feature = read_split(good / "paths_ds"), read_split(good / "inline_ds")
    assert key(by_path) == key(by_feature) == key(ref)
    assert by_path.examples[1].image == str(good / "paths_ds" / "imgs" / "b.png")
    for ex, want in zip(by_feature.examples, ref.examples):
        assert ex.image is None and ex.load_image is not None
        assert np.array_equal(np.asarray(ex.load_image().convert("RGB")),
                              np.asarray(Image.open(want.image).convert("RGB")))

    datasets.DatasetDict({"train": inline}).save_to_disk(str(good / "dict_ds"))
    msg = error_of(good / "dict_ds")
    assert "DatasetDict" in msg and "train" in msg and "one split" in msg


def test_missing_image_file_names_row_and_resolved_path(good: Path):
    (good / "imgs" / "b.png").unlink()
    msg = error_of(good / "train.csv")
    assert "train.csv row 3" in msg and str(good / "imgs" / "b.png") in msg and "not found" in msg
    assert "row 2" not in msg and "row 4" not in msg


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "text_as_jpg"])
def test_unreadable_images(good: Path, damage: str):
    target = good / "imgs" / "c.jpg"
    if damage == "truncated":
        save_image(target, size=(64, 64))
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "zero_bytes":
        target.write_bytes(b"")
    else:
        target.write_text("this is not an image\n")
    msg = error_of(good / "train.jsonl")
    assert "train.jsonl row 3" in msg and str(target) in msg and "cannot decode image" in msg
    # With checks off the row is accepted, and the dataset still fails clearly when it reaches the file.
    split = read_split(good / "train.jsonl", check_images=False)
    ds = MultimodalDataset(split, ["neg", "pos"], _processor(), TextEncoding([[1]] * 3, 0))
    with pytest.raises(DataError, match=r"train.jsonl row 3: cannot decode image .*c.jpg"):
        ds[2]


def test_decompression_bomb_warning_is_an_error(good: Path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 16x12=192 pixels: above the warning threshold only
    assert "DecompressionBombWarning" in error_of(good / "train.csv")


def test_unknown_label_in_eval_split(good: Path):
    write_jsonl(good / "eval.jsonl", [{"image": "imgs/a.jpg", "text": "x", "label": "pos"},
                                      {"image": "imgs/b.png", "text": "y", "label": "meh"}])
    msg = error_of(good / "eval.jsonl", label_names=["neg", "pos"])
    assert "eval.jsonl row 2" in msg and "'meh'" in msg and "neg, pos" in msg


def test_missing_column_names_config_key_and_existing_columns(good: Path):
    write_csv(good / "bad.csv", ["image", "caption", "label"], [["imgs/a.jpg", "hi", "pos"]])
    msg = error_of(good / "bad.csv")
    assert "bad.csv" in msg and "missing column 'text'" in msg and "data.text_column" in msg
    assert "image, caption, label" in msg
    assert read_split(good / "bad.csv", text_column="caption").examples[0].text == "hi"


def test_prediction_split_without_labels(good: Path):
    write_csv(good / "pred.csv", ["image", "text"], [["imgs/a.jpg", "hi"]])
    assert "data.label_column" in error_of(good / "pred.csv")
    assert read_split(good / "pred.csv", require_labels=False).examples[0].label is None


def test_empty_manifests(tmp_path: Path):
    write_csv(tmp_path / "h.csv", ["image", "text", "label"], [])
    (tmp_path / "e.jsonl").write_text("\n\n")
    for name in ("h.csv", "e.jsonl"):
        msg = error_of(tmp_path / name)
        assert name in msg and "no rows" in msg


def test_not_found_and_unknown_extension(tmp_path: Path):
    msg = error_of(tmp_path / "nope.csv")
    assert "nope.csv" in msg and "not found" in msg
    (tmp_path / "data.parquet").write_bytes(b"x")
    msg = error_of(tmp_path / "data.parquet")
    assert "'.parquet'" in msg and ".csv" in msg and ".jsonl" in msg and "save_to_disk" in msg


def test_malformed_json_line_and_missing_value(good: Path):
    (good / "m.jsonl").write_text('{"image": "imgs/a.jpg", "text": "ok", "label": "pos"}\n\n'
                                  '{"image": "imgs/b.png", "text": "oops", \n'
                                  '{"image": "imgs/c.jpg", "text": "  ", "label": "pos"}\n')
    msg = error_of(good / "m.jsonl")
    assert "m.jsonl row 3: malformed JSON" in msg and "Expecting" in msg
    assert "m.jsonl row 4: missing value in column 'text'" in msg and "row 1" not in msg
    write_csv(good / "m.csv", ["image", "text", "label"], [["imgs/a.jpg", "ok", "pos"], ["imgs/b.png", "x", ""]])
    assert "m.csv row 3: missing value in column 'label' (expected a class label)" in error_of(good / "m.csv")


def test_skip_bad_rows_drops_exactly_the_bad_rows(good: Path):
    (good / "imgs" / "zero.jpg").write_bytes(b"")
    records = [{"image": "imgs/a.jpg", "text": "ok1", "label": "pos"},
               {"image": "imgs/missing.jpg", "text": "gone", "label": "pos"},
               {"image": "imgs/b.png", "text": "ok2", "label": "neg"},
               {"image": "imgs/zero.jpg", "text": "empty", "label": "neg"},
               {"image": "imgs/c.jpg", "label": "pos"}]
    split = read_split(write_jsonl(good / "s.jsonl", records), skip_bad_rows=True)
    assert [ex.text for ex in split.examples] == ["ok1", "ok2"]
    assert [row for row, _ in split.skipped] == [2, 4, 5]
    assert "not found" in split.skipped[0][1] and "cannot decode" in split.skipped[1][1]
    assert "missing value in column 'text'" in split.skipped[2][1]


def test_all_rows_bad_still_raises_and_long_lists_are_cut(good: Path):
    write_jsonl(good / "bad.jsonl", [{"image": f"imgs/none{i}.jpg", "text": "t", "label": "pos"} for i in range(25)])
    msg = error_of(good / "bad.jsonl", skip_bad_rows=True)
    assert "every row" in msg and "row 20:" in msg and "row 21:" not in msg and "and 5 more" in msg


def test_label_names_and_class_counts(good: Path):
    split = read_split(good / "train.csv")
    assert label_names_from(split) == ["neg", "pos"] and class_counts(split, ["neg", "pos"]) == [1, 2]
    write_jsonl(good / "one.jsonl", [{"image": "imgs/a.jpg", "text": "t", "label": "pos"}])
    with pytest.raises(DataError, match=r"one.jsonl.*only the label 'pos'.*at least 2"):
        label_names_from(read_split(good / "one.jsonl"))


def _tokenizer(tmp_path: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "sunny", "day", "so", "gloomy", "fine", "weather"]
    (tmp_path / "tok").mkdir(exist_ok=True)
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # from_pretrained on a local folder works offline; transformers 5 ignores a vocab_file= keyword.
    return BertTokenizerFast.from_pretrained(str(tmp_path / "tok"))


def test_encode_texts_counts_truncation_exactly(tmp_path: Path):
    tok = _tokenizer(tmp_path)
    # [CLS] + words + [SEP]: 5 tokens fit exactly, 6 and 7 are cut, 3 is short.
    enc = encode_texts(tok, ["a sunny day", "a sunny day so", "a sunny day so gloomy", "fine"], max_length=5)
    assert enc.input_ids[0] == [tok.cls_token_id, 5, 6, 7, tok.sep_token_id]
    assert [len(ids) for ids in enc.input_ids] == [5, 5, 5, 3] and enc.truncated == 2
    assert enc.input_ids[2][-1] == tok.sep_token_id  # truncation keeps the closing special token
    assert encode_texts(tok, ["a sunny day so gloomy"] * 3, max_length=4).truncated == 3


def test_collator_padding_policies():
    items = [{"pixel_values": torch.zeros(3, 4, 4), "input_ids": ids, "labels": lab, "index": i}
             for i, (ids, lab) in enumerate([([5, 6, 7], 1), ([8], -1)])]
    longest = Collator(pad_token_id=0, padding="longest", max_length=6)(items)
    assert longest["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert longest["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert longest["pixel_values"].shape == (2, 3, 4, 4) and longest["labels"].tolist() == [1, -1]
    fixed = Collator(pad_token_id=9, padding="max_length", max_length=5)(items)
    assert fixed["input_ids"].tolist() == [[5, 6, 7, 9, 9], [8, 9, 9, 9, 9]]
    assert fixed["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert all(t.dtype == torch.long for k, t in fixed.items() if k != "pixel_values")
    with pytest.raises(ValueError, match="longest, max_length"):
        Collator(0, "do_not_pad", 5)


def _processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})


@pytest.mark.parametrize("source", ["train.csv", "inline_ds"])
def test_dataset_in_dataloader_with_worker(good: Path, source: str):
    if source == "inline_ds":
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_dict({"image": [str(good / "imgs" / n) for n, *_ in ROWS],
                                    "text": [t for _, t, _, _ in ROWS], "label": [lab for *_, lab, _ in ROWS]}
                                   ).cast_column("image", datasets.Image()).save_to_disk(str(good / source))
    split = read_split(good / source)
    tok = _tokenizer(good)
    names = label_names_from(split)
    ds = MultimodalDataset(split, names, _processor(), encode_texts(tok, [ex.text for ex in split.examples],
                                                                    max_length=8))
    ds = pickle.loads(pickle.dumps(ds))  # what a spawn-started worker would receive
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1,
                                         collate_fn=Collator(tok.pad_token_id, "longest", 8))
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]
    assert batches[0]["pixel_values"].shape == (2, 3, 8, 8) and batches[0]["pixel_values"].dtype == torch.float32
    assert batches[0]["labels"].tolist() == [1, 0] and batches[1]["labels"].tolist() == [1]
    assert batches[0]["input_ids"][0, 0].item() == tok.cls_token_id
    unlabeled = MultimodalDataset(split, None, _processor(), TextEncoding([[1]] * 3, 0))
    assert unlabeled[0]["labels"] == -1




def test_labels_differing_by_case_or_spaces_warn_or_merge(good: Path, caplog):
    labels = ["Positive", "positive ", "positive", "positive", "neg"]
    write_jsonl(good / "cased.jsonl", [{"image": "imgs/a.jpg", "text": str(i), "label": lab}
                                       for i, lab in enumerate(labels)])
    split = read_split(good / "cased.jsonl")
    with caplog.at_level("WARNING", logger="mmpeft.data.dataset"):
        names = label_names_from(split)
    assert names == ["Positive", "neg", "positive", "positive "]  # kept as given: nothing is changed unasked
    assert "1 label(s) are spelled several ways" in caplog.text
    assert "'Positive' (1 rows), 'positive' (2 rows), 'positive ' (1 rows)" in caplog.text
    assert "data.normalize_labels=true" in caplog.text

    merged = read_split(good / "cased.jsonl", normalize_labels=True)
    assert [ex.label for ex in merged.examples] == ["positive", "positive", "positive", "positive", "neg"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmpeft.data.dataset"):
        assert label_names_from(merged) == ["neg", "positive"]
    assert not caplog.text

    # an eval row spelled differently: an error that names the training spelling, or merged when asked
    write_jsonl(good / "eval.jsonl", [{"image": "imgs/a.jpg", "text": "x", "label": " POSITIVE"}])
    msg = error_of(good / "eval.jsonl", label_names=["neg", "positive"])
    assert "unknown label ' POSITIVE'" in msg and "'positive' differs only by case or spaces" in msg
    assert read_split(good / "eval.jsonl", label_names=["neg", "positive"],
                      normalize_labels=True).examples[0].label == "positive"


def test_sixteen_bit_and_float_images_are_scaled_not_whitened(tmp_path: Path):
    from mmpeft.data.manifest import Example, decode_image

    depth = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)  # 0 .. 65535 in steps of 257
    Image.fromarray(depth).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"
    Image.fromarray((np.arange(64, dtype=np.float32).reshape(8, 8) / 63)).save(tmp_path / "unit.tiff")
    Image.fromarray(np.full((8, 8), 300.0, dtype=np.float32)).save(tmp_path / "hdr.tiff")
    write_jsonl(tmp_path / "m.jsonl", [{"image": name, "text": "x", "label": "a"}
                                       for name in ("depth.png", "unit.tiff", "hdr.tiff")])
    msg = error_of(tmp_path / "m.jsonl")
    assert "row 3: cannot decode image" in msg and "hdr.tiff: a F image with values from 300 to 300" in msg
    assert "row 1" not in msg and "row 2" not in msg

    split = read_split(tmp_path / "m.jsonl", skip_bad_rows=True)
    rgb = MultimodalDataset(split, ["a"], None, TextEncoding([[1], [1]], 0)).load_image(0)
    pixels = np.asarray(rgb)
    assert rgb.mode == "RGB" and pixels[..., 0].ravel().tolist() == list(range(256))  # PIL alone: 255 nearly everywhere
    unit = np.asarray(decode_image(Example(str(tmp_path / "unit.tiff"), "x", "a", 2, "m")))
    assert unit.dtype == np.uint8 and unit.min() == 0 and unit.max() == 255
