"""Multimodal sentiment with LoRA on both towers of a dual encoder and a fusion head.

    accelerate launch recipes/lora_sentiment.py                      # embedded default, offline
    accelerate launch recipes/lora_sentiment.py --config recipes/configs/clip_b16_lora.yaml \
        model.name=openai/clip-vit-base-patch16 data.train=my/train.jsonl data.eval=my/val.jsonl

The loop itself is `mmpeft.train.train`, the same function `mmpeft train` runs: read it top to bottom there.
"""

import argparse
import sys

from mmpeft import load_config, train
from mmpeft.cli import report_user_errors


def recipe_main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (recipes/configs/*.yaml); defaults otherwise")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5 model.text.mode=frozen")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    return train(cfg)


if __name__ == "__main__":
    sys.exit(report_user_errors(recipe_main, "lora_sentiment.py"))
