"""Multimodal sentiment with LoRA on both towers of a dual encoder and a fusion head.

    accelerate launch recipes/lora_sentiment.py                      # embedded default, offline
    accelerate launch recipes/lora_sentiment.py --config recipes/configs/clip_b16_lora.yaml \
        model.name=openai/clip-vit-base-patch16 data.train=my/train.jsonl data.eval=my/val.jsonl

Without --config it runs recipes/configs/embedded_sentiment.yaml: the shipped tiny CLIP on the world's
sentiment task, with the learning rates and budget tuned for it.
The loop itself is `mmpeft.training.loop.train`, the same function `mmpeft train` runs: read it top to bottom there.
"""

import argparse
import sys
from pathlib import Path

from mmpeft import train
from mmpeft.export.hub import push_after_training
from mmpeft.cli import add_train_arguments, config_from_args, parse_with_overrides, report_user_errors

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "embedded_sentiment.yaml"


def recipe_config(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parse_with_overrides(parser, argv)
    args.config = args.config or str(DEFAULT_CONFIG)
    return config_from_args(args)


def recipe_main(argv: list[str] | None = None) -> dict:
    cfg = recipe_config(argv)
    results = train(cfg)
    push_after_training(cfg)  # `hub.push=true`
    return results


if __name__ == "__main__":
    sys.exit(report_user_errors(recipe_main, "lora_sentiment.py"))
