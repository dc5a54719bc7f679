"""Reading and validating one data split from a CSV, JSONL or datasets folder."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

SUPPORTED = ".csv, .jsonl, or a folder written by datasets.Dataset.save_to_disk"
_MAX_LISTED = 20
# role -> (config key that names the column, what one cell holds)
_ROLES = {"image": ("data.image_column", "image path"), "text": ("data.text_column", "caption"),
          "label": ("data.label_column", "class label")}


class DataError(ValueError):
    """Bad user data; the message names the file, row and what was expected."""


@dataclass
class Example:
    """One image+text row; `image` is None when the image is stored inline in a datasets folder."""

    image: str | None
    text: str
    label: str | None
    row: int
    source: str
    load_image: Callable[[], Image.Image] | None = None


@dataclass
class Split:
    """The usable examples of one manifest plus the rows dropped by skip_bad_rows."""

    examples: list[Example]
    source: str
    skipped: list[tuple[int, str]] = field(default_factory=list)


def raise_problems(problems: list[str], headline: str) -> None:
    """Raises one DataError listing the first problems, so every data error reads the same way."""
    if not problems:
        return
    lines = [headline] + [f"  - {p}" for p in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    raise DataError("\n".join(lines))


def _import_datasets(folder: str) -> Any:
    """Imports the optional `datasets` package, explaining how to get it."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{folder}: reading a datasets folder needs the `datasets` package; "
                        "install it with: pip install datasets") from e
    return datasets


_OPEN_DATASETS: dict[tuple[int, str, str], Any] = {}


@dataclass(frozen=True)
class DatasetsImage:
    """Picklable loader for one inline image of a datasets folder, reopened lazily once per process."""

    folder: str
    column: str
    index: int

    def __call__(self) -> Image.Image:
        # Keyed by pid: a forked DataLoader worker must not share the parent's open arrow handles.
        key = (os.getpid(), self.folder, self.column)
        ds = _OPEN_DATASETS.get(key)
        if ds is None:
            datasets = _import_datasets(self.folder)
            ds = datasets.load_from_disk(self.folder).select_columns([self.column])
            ds = ds.cast_column(self.column, datasets.Image(decode=False))
            _OPEN_DATASETS[key] = ds
        value = ds[self.index][self.column] or {}
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if not value.get("path"):
            raise OSError("the image cell holds neither bytes nor a path")
        return Image.open(os.path.join(self.folder, value["path"]))


def decode_image(example: Example) -> Image.Image:
    """Opens and fully decodes an example's image (callers decide how to treat decompression-bomb warnings)."""
    img = example.load_image() if example.load_image is not None else Image.open(example.image)
    img.load()  # Image.open is lazy; truncation only shows up when the pixels are read
    return img


def where(example: Example) -> str:
    """Names an example's image for error messages."""
    return example.image or f"inline image #{example.row}"


def _blank(value: Any) -> bool:
    """True for the ways a spreadsheet, JSON or pandas export leaves a cell empty."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets often write a BOM
        reader = csv.reader(f)
        header = next(reader, [])
        rows = []
        # csv.reader yields [] for blank lines, so counting them keeps numbers equal to spreadsheet rows.
        for row, fields in enumerate(reader, start=2):
            if not any(x.strip() for x in fields):
                continue
            if len(fields) > len(header):
                rows.append((row, f"{len(fields)} fields but the header has {len(header)}; "
                                  "expected one value per column"))
            else:
                rows.append((row, dict(zip(header, fields))))
    return header, rows


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[int, Any]]]:
    columns: dict[str, None] = {}
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((row, f"malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per line"))
                continue
            if not isinstance(record, dict):
                rows.append((row, f"expected a JSON object, found {type(record).__name__}"))
                continue
            columns.update(dict.fromkeys(record))
            rows.append((row, record))
    return list(columns), rows


def _read_datasets_folder(path: Path, source: str, wanted: list[str]) -> tuple[list[str], list[tuple[int, Any]]]:
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(f"{source}: holds a DatasetDict with splits {', '.join(splits)}; "
                        f"point at one split's folder instead, e.g. {path / (splits[0] if splits else 'train')}")
    if not ((path / "state.json").exists() or (path / "dataset_info.json").exists()):
        raise DataError(f"{source}: is a folder without state.json or dataset_info.json; expected {SUPPORTED}")
    datasets = _import_datasets(source)
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{source}: holds a DatasetDict with splits {', '.join(ds)}; point at one split's folder")
    folder = os.path.abspath(path)
    table = ds.with_format("arrow")  # column access without decoding images or copying into Python rows
    values: dict[str, list[Any]] = {}
    for col in (c for c in wanted if c in ds.column_names):
        if isinstance(ds.features[col], datasets.Image):
            values[col] = [None if null else DatasetsImage(folder, col, i)
                           for i, null in enumerate(table[col].is_null().to_pylist())]
        else:
            values[col] = table[col].to_pylist()
            if isinstance(ds.features[col], datasets.ClassLabel):  # class ids -> the names the user chose
                values[col] = [None if v is None else ds.features[col].int2str(v) for v in values[col]]
    rows = [(i + 1, {c: v[i] for c, v in values.items()}) for i in range(len(ds))]
    return ds.column_names, rows


def _build(record: Any, row: int, source: str, base: str, cols: dict[str, str],
           has_labels: bool, require_labels: bool, label_names: list[str] | None) -> tuple[Example | None, list[str]]:
    """Turns one raw record into an Example, or lists what is wrong with it."""
    if isinstance(record, str):
        return None, [record]
    errs = []
    for role in ("image", "text") + (("label",) if has_labels and require_labels else ()):
        if _blank(record.get(cols[role])):
            errs.append(f"missing value in column '{cols[role]}' (expected a {_ROLES[role][1]})")
    image, text, label = record.get(cols["image"]), record.get(cols["text"]), record.get(cols["label"])
    if not _blank(image) and not isinstance(image, (str, DatasetsImage)):
        errs.append(f"column '{cols['image']}' holds {type(image).__name__}; expected an image path string")
    if isinstance(text, (dict, list)):
        errs.append(f"column '{cols['text']}' holds {type(text).__name__}; expected a caption string")
    label = None if not has_labels or _blank(label) else str(label)
    if label is not None and label_names is not None and label not in label_names:
        errs.append(f"unknown label '{label}'; expected one of the training labels: {', '.join(label_names)}")
    if errs:
        return None, errs
    loader = image if isinstance(image, DatasetsImage) else None
    path = None if loader else os.path.abspath(os.path.join(base, os.path.expanduser(image)))
    return Example(path, str(text), label, row, source, loader), []


def _image_problem(example: Example, check_images: bool) -> str | None:
    """Says what is wrong with an example's image file, or None if it is usable."""
    if example.image is not None and not os.path.isfile(example.image):
        return f"image file not found: {example.image}"
    if not check_images:
        return None
    try:
        decode_image(example).close()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, bomb errors...; all mean "unreadable"
        return f"cannot decode image {where(example)} ({type(e).__name__}: {e}); expected a complete JPEG/PNG/... file"
    return None


def read_split(path: str | os.PathLike, *, image_column: str = "image", text_column: str = "text",
               label_column: str = "label", require_labels: bool = True, label_names: list[str] | None = None,
               check_images: bool = True, skip_bad_rows: bool = False) -> Split:
    """Reads a manifest, checks every row and image, and returns the examples or raises one DataError."""
    source = str(path)
    p = Path(path).expanduser()
    if p.is_dir():
        columns, rows = _read_datasets_folder(p, source, [image_column, text_column, label_column])
        base = str(p)
    elif not p.exists():
        raise DataError(f"{source}: manifest not found; expected {SUPPORTED}")
    elif p.suffix.lower() not in (".csv", ".jsonl"):
        raise DataError(f"{source}: unknown manifest extension '{p.suffix}'; expected {SUPPORTED}")
    else:
        reader = _read_csv if p.suffix.lower() == ".csv" else _read_jsonl
        try:
            columns, rows = reader(p)
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: is not UTF-8 text ({e}); expected a UTF-8 encoded manifest") from e
        base = str(p.parent)
    if not rows:
        raise DataError(f"{source}: the manifest has no rows; expected at least one example")
    cols = {"image": image_column, "text": text_column, "label": label_column}
    needed = ["image", "text"] + (["label"] if require_labels else [])
    # A JSONL file whose every line is malformed has no columns; report the lines, not the columns.
    if columns:
        raise_problems([f"{source}: missing column '{cols[r]}' (set {_ROLES[r][0]} to the column holding "
                        f"{_ROLES[r][1]}s); columns found: {', '.join(columns)}"
                        for r in needed if cols[r] not in columns], f"{source}: missing columns")
    has_labels = label_column in columns

    built = [(row, *_build(rec, row, source, base, cols, has_labels, require_labels, label_names))
             for row, rec in rows]
    candidates = [ex for _, ex, _ in built if ex is not None]
    with warnings.catch_warnings():
        # Set once around the pool: warning filters are process-global and not thread-safe to toggle per image.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            image_errs = dict(zip((ex.row for ex in candidates),
                                  pool.map(lambda ex: _image_problem(ex, check_images), candidates)))

    examples, skipped, problems = [], [], []
    for row, ex, errs in built:
        errs = errs or ([image_errs[row]] if image_errs[row] else [])
        if errs:
            skipped.append((row, "; ".join(errs)))
            problems.extend(f"{source} row {row}: {e}" for e in errs)
        else:
            examples.append(ex)
    if not examples:
        raise_problems(problems, f"{source}: every row is unusable ({len(skipped)} rows):")
    if not skip_bad_rows:
        raise_problems(problems, f"{source}: {len(problems)} problem(s) in {len(skipped)} row(s) "
                                 f"(fix them, or set data.skip_bad_rows to drop these rows):")
    return Split(examples, source, skipped if skip_bad_rows else [])
