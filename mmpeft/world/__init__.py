"""A procedural image+text world (offline, deterministic) and the tasks built on it.

* `scenes`: shapes and faces under a sky, drawn with PIL, with captions; some colour-shape pairs held out.
* `sentiment`: positive / neutral / negative posts where the label needs both image and text.
* `position`: left / center / right, a label the shipped tiny CLIP never learnt to read.
* `vocab`: the world's words, synonyms, and a CLIP BPE tokenizer sized to them.
* `zero_shot`: prompt-ensemble zero-shot accuracy per attribute.
"""

from .scenes import HELD_OUT, Scene, caption, pretraining_pair, render, sample_scene
from .sentiment import label_for, sentiment_example, write_sentiment

__all__ = ["HELD_OUT", "Scene", "caption", "label_for", "pretraining_pair", "render", "sample_scene",
           "sentiment_example", "write_sentiment"]
