"""Short names for backbones built offline on first use, so the default run needs no download."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .registry import register_short_name

EMBEDDED_BACKBONE = "tiny-clip"
_VERSION = "v1"


def cache_dir() -> Path:
    """Where built backbones live: $MMPEFT_CACHE, else ~/.cache/mmpeft."""
    return Path(os.environ.get("MMPEFT_CACHE", Path.home() / ".cache" / "mmpeft"))


def _tiny_clip() -> str:
    """A small randomly initialised CLIP, saved once with save_pretrained and loaded like any local folder."""
    from .tiny import build_tiny_backbone

    target = cache_dir() / f"{EMBEDDED_BACKBONE}-{_VERSION}"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build aside and rename: several ranks may race here, and a half-written folder must never be read.
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        build_tiny_backbone("clip", tmp, seed=0, image_size=32, patch_size=8, hidden_size=64, num_layers=2,
                            num_heads=4, projection_dim=64)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


register_short_name(EMBEDDED_BACKBONE, _tiny_clip)
