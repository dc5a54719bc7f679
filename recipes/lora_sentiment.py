"""Multimodal sentiment with LoRA on both towers of a dual encoder and a fusion head.

    accelerate launch recipes/lora_sentiment.py                      # embedded default, offline
    accelerate launch recipes/lora_sentiment.py --config recipes/configs/clip_b16_lora.yaml \
        model.name=openai/clip-vit-base-patch16 data.train=my/train.jsonl data.eval=my/val.jsonl

The loop itself is `mmpeft.train.train`, the same function `mmpeft train` runs: read it top to bottom there.
"""

import argparse
import sys

from mmpeft import train
from mmpeft.cli import add_train_arguments, config_from_args, report_user_errors


def recipe_main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    return train(cfg)


if __name__ == "__main__":
    sys.exit(report_user_errors(recipe_main, "lora_sentiment.py"))
