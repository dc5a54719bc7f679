"""Bad input, tried for real through `mmpeft train` and `mmpeft eval`: each case ends in exit code 2 with a
message naming the file, the row and what was expected, or in a skip counted in the metrics; never a traceback
and never a silently wrong result."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmpeft import load_config
from mmpeft.cli import main
from mmpeft.data import read_split
from mmpeft.training.loop import train

FAST = ["train.progress=false", "train.tracker=null", "train.mixed_precision=no", "data.num_workers=0",
        "train.max_steps=2", "data.batch_size=4", "head.hidden=8"]




# ---------------------------------------------------------------- bad files, made for real

def truncated_jpeg(path: Path) -> None:
    noise = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def text_named_jpg(path: Path) -> None:
    path.write_text("this is not an image\n")


def png_named_jpg(path: Path) -> None:
    Image.new("RGB", (32, 32), (200, 40, 40)).save(path, format="PNG")


def bomb_png(path: Path, pixels: int) -> None:
    """A valid 1-bit PNG of at least `pixels` pixels, a few KB on disk (written row by row, never held)."""
    side = math.isqrt(pixels) + 100
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def bomb_over_twice_the_limit(path: Path) -> None:
    bomb_png(path, 2 * Image.MAX_IMAGE_PIXELS)  # PIL raises DecompressionBombError on open


def bomb_over_the_limit(path: Path) -> None:
    bomb_png(path, Image.MAX_IMAGE_PIXELS)  # PIL only warns; mmpeft makes the warning an error


def test_the_bomb_is_a_real_image(tmp_path, monkeypatch):
    bomb_over_twice_the_limit(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(tmp_path / "bomb.png") as img:
        assert img.format == "PNG" and img.width * img.height > 2 * 89_478_485


# ---------------------------------------------------------------- manifests

def good_rows(folder: Path, n: int = 8) -> list[dict]:
    """n readable rows over the labels cat and dog, their images written into folder."""
    rows = []
    for i in range(n):
        label = ("cat", "dog")[i % 2]
        Image.new("RGB", (32, 32), (220, 30 + 20 * i, 30) if label == "cat" else (30, 30 + 20 * i, 220)).save(
            folder / f"good{i}.png")
        rows.append({"image": f"good{i}.png", "text": f"a photo of a {label} number {i}", "label": label})
    return rows


def jsonl(folder: Path, rows: list, name: str = "train.jsonl") -> Path:
    """Rows as JSONL; a str row is written as the raw line."""
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def train_args(model: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"model.name={model}", f"data.train={manifest}", f"train.output_dir={out}", *FAST, *extra]


BAD_IMAGES = {
    "truncated_jpeg": (truncated_jpeg, "cannot decode image"),
    "zero_bytes": (zero_bytes, "cannot decode image"),
    "text_named_jpg": (text_named_jpg, "cannot decode image"),
    "bomb_over_twice_the_limit": (bomb_over_twice_the_limit, "DecompressionBombError"),
    "bomb_over_the_limit": (bomb_over_the_limit, "DecompressionBombWarning"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_train_refuses_a_bad_image(kind, tiny_paths, tmp_path, capsys):
    make, expected = BAD_IMAGES[kind]
    make(tmp_path / "bad.jpg")
    manifest = jsonl(tmp_path, good_rows(tmp_path) + [{"image": "bad.jpg", "text": "hello", "label": "cat"}])
    code, err = cli(train_args(tiny_paths["clip"], manifest, tmp_path / "out"), capsys)
    assert code == 2
    assert f"{manifest} row 9: cannot decode image {tmp_path / 'bad.jpg'}" in err and expected in err
    assert "expected a complete JPEG/PNG/... file" in err and "data.skip_bad_rows" in err
    assert "row 8" not in err and not (tmp_path / "out" / "mmpeft.json").exists()


def test_unchecked_bad_image_fails_cleanly_in_a_loader_worker(tiny_paths, tmp_path, capsys):
    """With data.check_images=false the file is first read in a DataLoader worker, which wraps the error."""
    truncated_jpeg(tmp_path / "bad.jpg")
    manifest = jsonl(tmp_path, good_rows(tmp_path) + [{"image": "bad.jpg", "text": "hello", "label": "cat"}])
    code, err = cli(train_args(tiny_paths["clip"], manifest, tmp_path / "out", "data.check_images=false",
                               "data.num_workers=1", "train.max_steps=3"), capsys)
    assert code == 2
    assert f"error: {manifest} row 9: cannot decode image {tmp_path / 'bad.jpg'} (OSError: image file is truncated" in err
    assert "worker" not in err


def _latin1(folder: Path, name: str) -> Path:
    path = folder / name
    lines = ([json.dumps(r) for r in good_rows(folder)] if name.endswith(".jsonl") else
             ["image,text,label"] + [f"{r['image']},{r['text']},{r['label']}" for r in good_rows(folder)])
    lines.insert(3, lines[1].replace("a photo", "un caf\u00e9"))  # line 4 in latin-1: byte 0xe9
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    return path


def _unclosed_quote(folder: Path) -> Path:
    path = folder / "train.csv"
    rows = good_rows(folder)
    lines = ["image,text,label"] + [f"{r['image']},{r['text']},{r['label']}" for r in rows]
    lines[3] = f'{rows[2]["image"]},"an unclosed quote,{rows[2]["label"]}'
    path.write_text("\n".join(lines) + "\n")
    return path


def _datasets_folder(folder: Path, text: list) -> Path:
    datasets = pytest.importorskip("datasets")
    rows = good_rows(folder, 4)
    ds = datasets.Dataset.from_dict({"image": [r["image"] for r in rows], "text": text,
                                     "label": [r["label"] for r in rows]})
    ds.save_to_disk(str(folder / "ds"))
    for r in rows:  # paths in a datasets folder are relative to it
        (folder / r["image"]).rename(folder / "ds" / r["image"])
    return folder / "ds"


def _one_row(**row) -> callable:
    """A manifest of the good rows plus `row` as row 9."""
    return lambda folder: jsonl(folder, good_rows(folder) + [row])


BAD_MANIFESTS = {
    "latin1_csv": (lambda f: _latin1(f, "train.csv"),
                   ["train.csv line 4: not UTF-8 text (byte 0xe9", "expected a UTF-8 encoded manifest"]),
    "latin1_jsonl": (lambda f: _latin1(f, "train.jsonl"),
                     ["train.jsonl line 4: not UTF-8 text (byte 0xe9", "expected a UTF-8 encoded manifest"]),
    "broken_json_line": (lambda f: jsonl(f, good_rows(f) + ['{"image": "good0.png", "text": "cut off']),
                         ["train.jsonl row 9: malformed JSON", "expected one JSON object per line"]),
    "json_array_line": (lambda f: jsonl(f, good_rows(f) + ['["good0.png", "a list", "cat"]']),
                        ["train.jsonl row 9: expected a JSON object, found list"]),
    "unclosed_csv_quote": (_unclosed_quote, ["train.csv row 4: malformed CSV", "quoted field to be closed"]),
    "label_is_a_list": (_one_row(image="good0.png", text="two labels", label=["cat", "dog"]),
                        ["row 9: column 'label' holds list ['cat', 'dog']; expected a class label string"]),
    "label_is_a_dict": (_one_row(image="good0.png", text="nested", label={"name": "cat"}),
                        ["row 9: column 'label' holds dict {'name': 'cat'}; expected a class label string"]),
    "text_is_a_dict": (_one_row(image="good0.png", text={"en": "hi"}, label="cat"),
                       ["row 9: column 'text' holds dict {'en': 'hi'}; expected a caption string"]),
    "image_is_a_number": (_one_row(image=17, text="hi", label="cat"),
                          ["row 9: column 'image' holds int; expected an image path string"]),
    "text_is_null": (_one_row(image="good0.png", text=None, label="cat"),
                     ["row 9: missing value in column 'text' (expected a caption)"]),
    "text_is_empty": (_one_row(image="good0.png", text="", label="cat"),
                      ["row 9: missing value in column 'text' (expected a caption)"]),
    "label_is_missing": (_one_row(image="good0.png", text="no label"),
                         ["row 9: missing value in column 'label' (expected a class label)"]),
    "image_outside_root": (_one_row(image="../elsewhere.png", text="hi", label="cat"),
                           ["row 9: image path '../elsewhere.png' resolves to", "data.allow_outside_root=true"]),
    "single_class": (lambda f: jsonl(f, [r for r in good_rows(f) if r["label"] == "cat"]),
                     ["train.jsonl: training data has only the label 'cat'; expected at least 2 classes"]),
    "datasets_bytes_text": (lambda f: _datasets_folder(f, ["fine", "caf\u00e9".encode("latin-1"), "ok", "ok"]),
                            ["ds row 2: column 'text' holds bytes b'caf\\xe9'; expected a caption string"]),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_train_refuses_a_bad_manifest(case, tiny_paths, tmp_path, capsys):
    make, expected = BAD_MANIFESTS[case]
    manifest = make(tmp_path)
    code, err = cli(train_args(tiny_paths["clip"], manifest, tmp_path / "out"), capsys)
    assert code == 2
    assert str(manifest) in err
    for text in expected:
        assert text in err
    assert not (tmp_path / "out" / "mmpeft.json").exists()


def test_skip_bad_rows_trains_on_the_rest_and_counts_each_skip(tiny_paths, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    folder = tmp_path / "data"
    for name, make in (("truncated.jpg", truncated_jpeg), ("zero.jpg", zero_bytes), ("text.jpg", text_named_jpg),
                       ("bomb.png", bomb_over_twice_the_limit), ("png.jpg", png_named_jpg)):
        make(folder / name)
    png_named_jpg(tmp_path / "outside.jpg")
    rows = good_rows(folder) + [
        {"image": "png.jpg", "text": "a png named .jpg loads", "label": "cat"},  # row 9: fine
        {"image": "good1.png", "text": 42, "label": "dog"},  # row 10: fine, the caption "42"
        {"image": "../outside.jpg", "text": "allowed by the config", "label": "dog"},  # row 11: fine here
        {"image": "truncated.jpg", "text": "t", "label": "cat"},  # 12
        {"image": "zero.jpg", "text": "z", "label": "cat"},  # 13
        {"image": "text.jpg", "text": "x", "label": "dog"},  # 14
        {"image": "bomb.png", "text": "b", "label": "dog"},  # 15
        '{"image": "good0.png", "text": ',  # 16
        {"image": "good0.png", "text": "l", "label": ["cat"]},  # 17
        {"image": "good0.png", "text": None, "label": "cat"},  # 18
        {"image": "good0.png", "text": "", "label": "cat"},  # 19
        {"image": "good0.png", "text": "no label"},  # 20
    ]
    manifest = jsonl(folder, rows)
    out = tmp_path / "out"
    code, err = cli(["train", "--skip-bad-rows", *train_args(tiny_paths["clip"], manifest, out)[1:],
                     "data.allow_outside_root=true"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    report = metrics["data"]["train"]
    assert metrics["steps"] == 2 and report["examples"] == 11
    skipped = {s["row"]: s["reason"] for s in report["skipped_rows"]}
    assert sorted(skipped) == list(range(12, 21))
    for row, text in [(12, "cannot decode image"), (13, "cannot decode image"), (14, "cannot decode image"),
                      (15, "DecompressionBombError"), (16, "malformed JSON"), (17, "holds list"),
                      (18, "missing value in column 'text'"), (19, "missing value in column 'text'"),
                      (20, "missing value in column 'label'")]:
        assert text in skipped[row], (row, skipped[row])
    split = read_split(manifest, skip_bad_rows=True, allow_outside_root=True)
    assert [ex.text for ex in split.examples if ex.row in (9, 10, 11)] == [
        "a png named .jpg loads", "42", "allowed by the config"]


def test_skipping_down_to_one_class_is_still_refused(tiny_paths, tmp_path, capsys):
    zero_bytes(tmp_path / "zero.jpg")
    rows = [r if r["label"] == "cat" else {**r, "image": "zero.jpg"} for r in good_rows(tmp_path)]
    manifest = jsonl(tmp_path, rows)
    code, err = cli(train_args(tiny_paths["clip"], manifest, tmp_path / "out", "data.skip_bad_rows=true"), capsys)
    assert code == 2 and "training data has only the label 'cat'; expected at least 2 classes" in err


# ---------------------------------------------------------------- `mmpeft eval` against a trained adapter

@pytest.fixture(scope="module")
def adapter(tiny_paths, tmp_path_factory) -> Path:
    """An adapter trained for 2 steps on cat/dog."""
    folder = tmp_path_factory.mktemp("adapter-data")
    manifest = jsonl(folder, good_rows(folder))
    out = tmp_path_factory.mktemp("adapter") / "out"
    train(load_config(None, [f"model.name={tiny_paths['clip']}", f"data.train={manifest}",
                             f"train.output_dir={out}", *FAST]))
    return out


def eval_args(adapter: Path, manifest: Path, *extra: str) -> list[str]:
    return ["eval", "--adapter", str(adapter), "--data", str(manifest), "--num-workers", "0", *extra]


BAD_EVAL = {
    "unknown_label": (_one_row(image="good0.png", text="a bird", label="bird"),
                      ["row 9: unknown label 'bird'; expected one of the training labels: cat, dog"]),
    "label_is_a_dict": (_one_row(image="good0.png", text="nested", label={"name": "cat"}),
                        ["row 9: column 'label' holds dict"]),
    "latin1": (lambda f: _latin1(f, "eval.jsonl"), ["eval.jsonl line 4: not UTF-8 text"]),
    "truncated_jpeg": (lambda f: (truncated_jpeg(f / "bad.jpg"), _one_row(image="bad.jpg", text="t", label="cat")(f))[1],
                       ["row 9: cannot decode image"]),
    "image_outside_root": (_one_row(image="../elsewhere.png", text="hi", label="cat"),
                           ["row 9: image path '../elsewhere.png'", "data.allow_outside_root=true"]),
}


@pytest.mark.parametrize("case", sorted(BAD_EVAL))
def test_eval_refuses_bad_data(case, adapter, tmp_path, capsys):
    make, expected = BAD_EVAL[case]
    manifest = make(tmp_path)
    code, err = cli(eval_args(adapter, manifest, "--output", str(tmp_path / "eval.json")), capsys)
    assert code == 2 and str(manifest) in err
    for text in expected:
        assert text in err
    assert not (tmp_path / "eval.json").exists()


def test_eval_skip_bad_rows_counts_the_skips(adapter, tmp_path, capsys):
    truncated_jpeg(tmp_path / "bad.jpg")
    rows = good_rows(tmp_path, 6) + [{"image": "bad.jpg", "text": "t", "label": "cat"},
                                     {"image": "good0.png", "text": "a bird", "label": "bird"}]
    manifest = jsonl(tmp_path, rows, "eval.jsonl")
    code, err = cli(eval_args(adapter, manifest, "--skip-bad-rows", "--output", str(tmp_path / "e.json")), capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert metrics["num_samples"] == 6
    assert [(s["row"], s["reason"].split(";")[0].split(" (")[0]) for s in metrics["data"]["skipped_rows"]] == [
        (7, f"cannot decode image {tmp_path / 'bad.jpg'}"), (8, "unknown label 'bird'")]
