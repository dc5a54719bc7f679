"""Short names for the backbones that ship with mmpeft, so the default run needs no download.

* `tiny-clip`: a 1.8M-parameter CLIP pretrained on `mmpeft.world` by `recipes/pretrain_clip.py`, shipped
  inside the package (`mmpeft/pretrained/tiny-clip-world`, with the card the recipe wrote).
* `tiny-clip-random`: the same architecture and tokenizer with random weights, built once into the cache:
  the "from scratch" side of every pretrained-vs-random comparison.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import BackboneError
from .custom import seeded_init
from .registry import register_short_name

EMBEDDED_BACKBONE = "tiny-clip"
RANDOM_BACKBONE = "tiny-clip-random"
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained" / "tiny-clip-world"
_SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "preprocessor_config.json")


def cache_dir() -> Path:
    """Where built backbones and generated data live: $MMPEFT_CACHE, else ~/.cache/mmpeft."""
    return Path(os.environ.get("MMPEFT_CACHE", Path.home() / ".cache" / "mmpeft"))


def _tiny_clip() -> str:
    missing = [name for name in _SHIPPED_FILES if not (PRETRAINED_DIR / name).is_file()]
    if missing:
        raise BackboneError(f"The shipped tiny CLIP in {PRETRAINED_DIR} lacks {', '.join(missing)}: the mmpeft install "
                            "is incomplete (reinstall it), or rebuild it with `python recipes/pretrain_clip.py "
                            f"--out {PRETRAINED_DIR} --overwrite`.")
    return str(PRETRAINED_DIR)


def _tiny_clip_random() -> str:
    """The shipped config, tokenizer and processor around freshly initialised weights (seed 0)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    source = Path(_tiny_clip())
    target = cache_dir() / f"{RANDOM_BACKBONE}-{_config_digest(source)}"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build aside and rename: several ranks may race here, and a half-written folder must never be read.
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        # Seeded inside a forked RNG: the weights are those of seed 0 every time, and the caller's seed (set before
        # the first use builds this) is left as it was.
        seeded_init(lambda: CLIPModel(CLIPConfig.from_pretrained(source)), seed=0).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        CLIPImageProcessor.from_pretrained(source).save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _config_digest(folder: Path) -> str:
    import hashlib

    return hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:12]


register_short_name(EMBEDDED_BACKBONE, _tiny_clip, "1.8M-parameter CLIP pretrained on mmpeft.world, shipped in the "
                    "package (the default)")
register_short_name(RANDOM_BACKBONE, _tiny_clip_random, "tiny-clip's architecture with random weights, built "
                    "offline on first use")
