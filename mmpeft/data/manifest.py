"""Reading and validating one data split from a CSV, JSONL or datasets folder."""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from ..errors import DataError  # noqa: F401  (raised here; importable from here too)

SUPPORTED = ".csv, .jsonl, or a folder written by datasets.Dataset.save_to_disk"
_MAX_LISTED = 20
# role -> (config key that names the column, what one cell holds)
_ROLES = {"image": ("data.image_column", "image path"), "text": ("data.text_column", "caption"),
          "label": ("data.label_column", "class label")}


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
    """Picklable loader for one inline (bytes) image of a datasets folder, reopened lazily once per process."""

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
        if not value.get("bytes"):
            raise OSError("the image cell holds no bytes")
        return Image.open(io.BytesIO(value["bytes"]))


def decode_image(example: Example) -> Image.Image:
    """Opens and fully decodes an example's image as 8 bits per channel (callers decide how to treat
    decompression-bomb warnings)."""
    img = example.load_image() if example.load_image is not None else Image.open(example.image)
    img.load()  # Image.open is lazy; truncation only shows up when the pixels are read
    return eight_bit(img, where(example))


def eight_bit(img: Image.Image, name: str) -> Image.Image:
    """A 16-bit or 32-bit grayscale image scaled to 8 bits ("L"); other modes unchanged.

    PIL's `convert("RGB")` clips such pixels at 255 instead of scaling them, so a 16-bit PNG becomes a nearly
    solid white picture. Integer images are 16-bit ranges (PNG, TIFF): divided by 257. Float images must hold
    values in [0, 1]; anything else has no agreed scale and is refused, naming the file.
    """
    if img.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return img
    import numpy as np

    pixels = np.asarray(img, dtype=np.float64)
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    scale = 1.0 if img.mode == "F" else 65535.0
    if low < 0 or high > scale:
        raise DataError(f"{name}: a {img.mode} image with values from {low:g} to {high:g}; expected "
                        f"{'a float image in [0, 1]' if img.mode == 'F' else '16-bit values (0-65535)'}: "
                        "save it as an 8-bit or 16-bit PNG/JPEG")
    return Image.fromarray(np.round(pixels * (255.0 / scale)).astype(np.uint8))


def where(example: Example) -> str:
    """Names an example's image for error messages."""
    return example.image or f"inline image #{example.row}"


def _blank(value: Any) -> bool:
    """True for the ways a spreadsheet, JSON or pandas export leaves a cell empty."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _read_text(path: Path, source: str) -> str:
    """The manifest's text; a file in another encoding fails naming its first line that is not UTF-8."""
    raw = path.read_bytes()
    raw = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw  # spreadsheets often write a BOM
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{source} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} cannot be decoded); "
                        "expected a UTF-8 encoded manifest: re-save it as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name})") from None


def _read_csv(path: Path, source: str) -> tuple[list[str], list[tuple[int, Any]]]:
    # strict: an unclosed quote is an error instead of swallowing every following line into one field.
    reader = csv.reader(io.StringIO(_read_text(path, source), newline=""), strict=True)
    header, rows, row = [], [], 1
    try:
        header = next(reader, [])
        # csv.reader yields [] for blank lines, so counting them keeps numbers equal to spreadsheet rows.
        for row, fields in enumerate(reader, start=2):
            if not any(x.strip() for x in fields):
                continue
            if len(fields) > len(header):
                rows.append((row, f"{len(fields)} fields but the header has {len(header)}; "
                                  "expected one value per column"))
            else:
                rows.append((row, dict(zip(header, fields))))
    except csv.Error as e:
        raise DataError(f"{source} row {row + 1 if header else 1}: malformed CSV ({e}); expected every quoted "
                        'field to be closed, with quotes inside it doubled ("")') from None
    return header, rows


def _read_jsonl(path: Path, source: str) -> tuple[list[str], list[tuple[int, Any]]]:
    columns: dict[str, None] = {}
    rows = []
    for row, line in enumerate(io.StringIO(_read_text(path, source), newline=None), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((row, f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno}); "
                              "expected one JSON object per line"))
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
            import pyarrow.compute as pc

            # A cell with bytes is read from the arrow file; one with only a path is a path like any other.
            cells = table[col]
            inline = pc.is_valid(pc.struct_field(cells, "bytes")).to_pylist()
            paths = pc.struct_field(cells, "path").to_pylist()
            values[col] = [None if null else DatasetsImage(folder, col, i) if inline[i] else paths[i]
                           for i, null in enumerate(cells.is_null().to_pylist())]
        else:
            values[col] = table[col].to_pylist()
            if isinstance(ds.features[col], datasets.ClassLabel):  # class ids -> the names the user chose; -1 = none
                values[col] = [None if v is None or v < 0 else ds.features[col].int2str(v) for v in values[col]]
    rows = [(i + 1, {c: v[i] for c, v in values.items()}) for i in range(len(ds))]
    return ds.column_names, rows


def _outside(path: str, root: str) -> bool:
    """True if `path`, with every symlink resolved, is not inside the (resolved) folder `root`."""
    try:
        return os.path.commonpath([os.path.realpath(path), root]) != root
    except ValueError:  # different drives
        return True


def _build(record: Any, row: int, source: str, base: str, cols: dict[str, str], has_labels: bool,
           require_labels: bool, label_names: list[str] | None, root: str | None,
           require_text: bool = True, normalize_labels: bool = False) -> tuple[Example | None, list[str]]:
    """Turns one raw record into an Example, or lists what is wrong with it; `root` None allows any image path."""
    if isinstance(record, str):
        return None, [record]
    errs = []
    for role in ("image",) + (("text",) if require_text else ()) + (("label",) if has_labels and require_labels else ()):
        if _blank(record.get(cols[role])):
            errs.append(f"missing value in column '{cols[role]}' (expected a {_ROLES[role][1]})")
    image, text, label = record.get(cols["image"]), record.get(cols["text"]), record.get(cols["label"])
    if not _blank(image) and not isinstance(image, (str, DatasetsImage)):
        errs.append(f"column '{cols['image']}' holds {type(image).__name__}; expected an image path string")
    # Numbers are fine as captions or labels (str() of them); containers or bytes would become a garbled string.
    wrong = {role for role, value in (("text", text), ("label", label if has_labels else None))
             if not _blank(value) and not isinstance(value, (str, int, float))}
    errs += [f"column '{cols[role]}' holds {type(value).__name__} {_short(value)}; expected a {_ROLES[role][1]} string"
             for role, value in (("text", text), ("label", label)) if role in wrong]
    label = None if not has_labels or _blank(label) or "label" in wrong else str(label)
    if label is not None and label_names is not None and label not in label_names:
        near = [n for n in label_names if label_key(n) == label_key(label)]
        if normalize_labels and near:
            label = near[0]
        else:
            hint = (f" ('{near[0]}' differs only by case or spaces: fix the row or set data.normalize_labels=true)"
                    if near else "")
            errs.append(f"unknown label '{label}'; expected one of the training labels: {', '.join(label_names)}"
                        + hint)
    path = None
    if isinstance(image, str) and not _blank(image):
        path = os.path.abspath(os.path.join(base, os.path.expanduser(image)))
        if root is not None and _outside(path, root):
            errs.append(f"image path '{image}' resolves to {os.path.realpath(path)}, outside the data root {root}; "
                        "set data.allow_outside_root=true to allow it")
    if errs:
        return None, errs
    loader = image if isinstance(image, DatasetsImage) else None
    return Example(path, "" if _blank(text) else str(text), label, row, source, loader), []


def label_key(label: str) -> str:
    """What two spellings of one class share: `"Positive"` and `"positive "` are the same key."""
    return label.strip().casefold()


def label_variants(examples: list[Example]) -> dict[str, Counter]:
    """Keys spelled more than one way -> how many rows use each spelling."""
    groups: dict[str, Counter] = {}
    for ex in examples:
        if ex.label is not None:
            groups.setdefault(label_key(ex.label), Counter())[ex.label] += 1
    return {key: spellings for key, spellings in groups.items() if len(spellings) > 1}


def unify_labels(examples: list[Example]) -> dict[str, str]:
    """Give every spelling of a class the one most rows use (stripped); returns spelling -> chosen name."""
    renamed = {}
    for spellings in label_variants(examples).values():
        chosen = max(sorted(spellings), key=lambda s: spellings[s]).strip()
        renamed.update({s: chosen for s in spellings if s != chosen})
    for ex in examples:
        ex.label = renamed.get(ex.label, ex.label)
    return renamed


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
               check_images: bool = True, skip_bad_rows: bool = False, allow_outside_root: bool = False,
               require_text: bool = True, column_options: dict[str, str] | None = None,
               normalize_labels: bool = False) -> Split:
    """Reads a manifest, checks every row and image, and returns the examples or raises one DataError.

    `require_text=False` (for heads that never read the caption: `prompt`, `image_only`) accepts a manifest
    without a text column, or with blank captions.

    Image paths are relative to the manifest's folder (the data root); unless `allow_outside_root`, a path that
    leaves it (`../`, an absolute path elsewhere, a symlink pointing out) is a bad row.

    `column_options` (role -> option, e.g. {"image": "--image-column"}) is what a missing column's message tells the
    user to set; by default the `data.*_column` config keys.
    `normalize_labels` merges labels that differ only by case or surrounding spaces (into the spelling most rows
    use, or the training label's); without it they stay separate classes and `label_names_from` warns.
    """
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
        columns, rows = reader(p, source)
        base = str(p.parent)
    if not rows:
        raise DataError(f"{source}: the manifest has no rows; expected at least one example")
    cols = {"image": image_column, "text": text_column, "label": label_column}
    needed = ["image"] + (["text"] if require_text else []) + (["label"] if require_labels else [])
    # A JSONL file whose every line is malformed has no columns; report the lines, not the columns.
    if columns:
        options = {role: key for role, (key, _) in _ROLES.items()} | (column_options or {})
        raise_problems([f"{source}: missing column '{cols[r]}' (set {options[r]} to the column holding "
                        f"{_ROLES[r][1]}s); columns found: {', '.join(columns)}"
                        for r in needed if cols[r] not in columns], f"{source}: missing columns")
    has_labels = label_column in columns

    root = None if allow_outside_root else os.path.realpath(base)
    built = [(row, *_build(rec, row, source, base, cols, has_labels, require_labels, label_names, root, require_text,
                           normalize_labels)) for row, rec in rows]
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
    if normalize_labels:
        unify_labels(examples)
    return Split(examples, source, skipped if skip_bad_rows else [])


def read_column(path: str | os.PathLike, column: str) -> dict[int, Any] | None:
    """`row -> value` of one extra column of a CSV / JSONL manifest (rows numbered as in `Example.row`), or None
    when the manifest has no such column (or is a datasets folder): provenance such as the world's `decided_by`."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in (".csv", ".jsonl") or not p.is_file():
        return None
    columns, rows = (_read_csv if p.suffix.lower() == ".csv" else _read_jsonl)(p, str(path))
    if column not in columns:
        return None
    return {row: rec.get(column) for row, rec in rows if isinstance(rec, dict)}
