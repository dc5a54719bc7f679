"""Writing a world data set to disk: reuse a complete set written with the same arguments, else start afresh."""

from __future__ import annotations

import json
from pathlib import Path

MARKER = "world.json"


def already_written(out: Path, paths: dict[str, Path], args: dict) -> bool:
    """True if `out` holds every manifest of a set written with `args`; otherwise prepare `out` for writing."""
    marker = out / MARKER
    if marker.exists() and all(p.exists() for p in paths.values()):
        try:
            if json.loads(marker.read_text()) == args:
                return True
        except json.JSONDecodeError:
            pass  # a damaged marker just means "write it again"
    marker.unlink(missing_ok=True)  # written last: an interrupted run is never mistaken for a complete one
    (out / "images").mkdir(parents=True, exist_ok=True)
    return False


def write_manifest(path: Path, rows: list[dict]) -> None:
    """JSON lines, written aside and renamed into place."""
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


def mark_written(out: Path, args: dict) -> None:
    (out / MARKER).write_text(json.dumps(args, indent=2) + "\n")
