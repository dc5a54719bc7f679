"""The on-disk form shared by `FeatureCache` and `StateCache`: one tensor's raw bytes and a marker written last.

`root/<key>/<name>.bin` holds the bytes, `root/<key>/complete.json` its shape, dtype and the cache's own facts.
Each file is written under a temporary name and renamed into place, the marker last, so a cache cut off half-way
(or one that another process is still writing) is never read as complete. A complete folder is never rewritten:
its key says it holds these very values (two splits of the same inputs share a key), and rewriting it while
another process maps it could hand that process half a file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

MARKER = "complete.json"


def is_complete(folder: Path | None) -> bool:
    return folder is not None and (folder / MARKER).is_file()


def write_complete(folder: Path, name: str, tensor: torch.Tensor, meta: dict) -> bool:
    """Write `tensor` and its marker (with `meta`) under `folder`; False when the folder was complete already."""
    if is_complete(folder):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    tensor = tensor.contiguous()
    suffix = f".{os.getpid()}.tmp"
    data = folder / f"{name}.bin"
    tensor.view(torch.uint8).numpy().tofile(data.with_name(data.name + suffix))
    os.replace(data.with_name(data.name + suffix), data)
    marker = {**meta, "file": data.name, "shape": list(tensor.shape),
              "dtype": str(tensor.dtype).removeprefix("torch.")}
    (folder / (MARKER + suffix)).write_text(json.dumps(marker))
    os.replace(folder / (MARKER + suffix), folder / MARKER)
    return True


def read_complete(folder: Path) -> tuple[torch.Tensor, dict]:
    """The tensor of a complete folder, memory-mapped (copy on write), and its marker."""
    meta = json.loads((folder / MARKER).read_text())
    tensor = torch.from_file(str(folder / meta["file"]), shared=False, size=math.prod(meta["shape"]),
                             dtype=getattr(torch, meta["dtype"]))
    return tensor.view(*meta["shape"]), meta
