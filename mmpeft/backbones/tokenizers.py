"""CLIP's byte-level BPE tokenizer built from open_clip's shipped merges file, so it exists offline.

`CLIPTokenizer.from_pretrained(<hub id>)` without the Hub gives a tokenizer of two tokens; open_clip ships the
BPE merges inside its package. One builder serves the open_clip family's tokenizer, the tiny test backbones and
the world's small vocabulary.
"""

from __future__ import annotations

import gzip
from functools import lru_cache

# CLIP's vocabulary: 256 bytes, the same 256 with an end-of-word mark, 48,894 merges, two special tokens.
CLIP_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=1)
def clip_bpe_merges() -> tuple[tuple[str, str], ...]:
    """All of CLIP's BPE merges in rank order, read from open_clip's packaged file."""
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:1 + CLIP_MERGES]  # 0: "#version"
    return tuple(tuple(line.split()) for line in lines)


def clip_bpe_tokenizer(merges: int | list[tuple[str, str]], max_length: int):
    """A stock `CLIPTokenizer` over the first `merges` of CLIP's merges (an int) or the given subset of them.

    The vocabulary is built in open_clip's `SimpleTokenizer` order, so the first N merges give the real CLIP ids.
    """
    import transformers as tf
    from open_clip.tokenizer import bytes_to_unicode

    chosen = list(clip_bpe_merges()[:merges]) if isinstance(merges, int) else list(merges)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in chosen] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = list(dict.fromkeys(vocab))
    return tf.CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=chosen,
                            pad_token="<|endoftext|>", model_max_length=max_length)
