"""The world's words, their synonyms (for text augmentation) and a CLIP BPE tokenizer sized to them.

The tokenizer keeps only the merges of open_clip's CLIP BPE that the world's words (and a list of common
English words) use, so every such word is one token exactly as in real CLIP, the vocabulary stays small
(a few thousand entries instead of 49,408), and any other text still tokenizes, into smaller pieces.
It is a stock `CLIPTokenizer` (vocab.json + merges.txt) that loads offline with `from_pretrained`.
"""

from __future__ import annotations

import re

from . import scenes, sentiment

# Groups of interchangeable words; swapping within a group keeps an example's meaning (and label).
SYNONYMS = (
    ("love", "adore", "like"), ("wonderful", "lovely", "great", "amazing"), ("awful", "terrible", "dreadful"),
    ("happy", "glad", "pleased"), ("sad", "unhappy", "upset"), ("picture", "photo", "image"),
    ("joy", "delight", "happiness"), ("misery", "sorrow", "gloom"), ("gloomy", "bleak", "dismal"),
    ("posted", "shared"), ("middle", "center"), ("best", "finest"), ("worst", "poorest"),
    ("absolutely", "truly", "really"), ("sight", "view", "scene"), ("ruined", "spoiled"), ("made", "brightened"),
    ("dark", "black"),
)

COMMON = """a an the this that these those some all no one two three four five many few more most other another
each every both only very just also too so not and or but if then than of in on at by for with about between into
under over near far here there when where why how what which who it its he she they them his her their we us our
you your i me my is are was were be been being have has had do does did can could will would should may might
photo picture image drawing painting sketch view scene photograph cartoon rendering closeup
dog cat bird fish horse man woman person people child boy girl baby friend car bus tree flower sky cloud sun moon
star rain snow water day night morning evening today yesterday walk home way record
red orange yellow green blue purple pink brown black white gray grey gold silver dark light bright colorful
big small large little tall short long wide old new young good bad happy sad beautiful pretty ugly nice fine
left right top bottom center middle side front back up down above below
smiling frowning neutral laughing crying angry calm face faces shape shapes circle square triangle heart
""".split()


def world_words() -> list[str]:
    """Every word the world's captions, posts, prompts and synonym groups can contain, plus common words."""
    texts = [" ".join(scenes.COLOURS), " ".join(scenes.SHAPES), " ".join(scenes.PLURALS.values()),
             " ".join(scenes.EXPRESSIONS), " ".join(scenes.COUNTS.values()), " ".join(scenes.POSITIONS),
             " ".join(scenes.WEATHERS), *scenes.CAPTION_TEMPLATES, *sum(scenes.WEATHER_PHRASES.values(), ()),
             *sum(scenes.POSITION_PHRASES.values(), ()), *sum(sentiment.OPINIONS.values(), ()),
             *sentiment.POST_TEMPLATES, *sentiment.DESCRIPTIONS, *sentiment.WHERE.values(),
             " ".join(sentiment.LABELS), "a photo of a {}.", " ".join(sum(SYNONYMS, ())),
             " ".join(COMMON)]
    words = set()
    for text in texts:
        words.update(re.findall(r"[a-z]+|[^\sa-z{}]", text.lower()))
    return sorted(words)


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to `word`, in order (the same algorithm as open_clip's SimpleTokenizer)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def build_world_tokenizer(words: list[str] | None = None, max_length: int = 32):
    """A `CLIPTokenizer` whose merges are the subset of CLIP's that `words` need (in CLIP's rank order)."""
    from ..backbones.tokenizers import clip_bpe_merges, clip_bpe_tokenizer

    all_merges = clip_bpe_merges()
    ranks = {m: i for i, m in enumerate(all_merges)}
    needed = set()
    for word in words or world_words():
        needed.update(_bpe_merges_used(word, ranks))
    return clip_bpe_tokenizer([m for m in all_merges if m in needed], max_length=max_length)
