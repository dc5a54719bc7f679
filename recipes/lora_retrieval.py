"""Image-caption retrieval with LoRA on both towers of a dual encoder and the symmetric contrastive (CLIP) loss.

    accelerate launch recipes/lora_retrieval.py                      # embedded default, offline
    accelerate launch recipes/lora_retrieval.py --config recipes/configs/embedded_retrieval.yaml \
        model.name=openai/clip-vit-base-patch16 data.train=my/train.jsonl data.eval=my/val.jsonl data.test=my/test.jsonl

Without --config it runs recipes/configs/embedded_retrieval.yaml (the shipped tiny CLIP on the world's
image-caption pairs). Manifests hold an image and its caption (`image`, `text`; no label). Recall@1/5/10,
image->text and text->image, is measured on the eval and test splits before training (zero-shot) and after;
the recipe ends with the two side by side. The loop is `mmpeft.training.loop.train` with `task=retrieval`, the same function `mmpeft train` runs.
"""

import argparse
import sys
from pathlib import Path

from mmpeft import train
from mmpeft.export.hub import push_after_training
from mmpeft.cli import add_train_arguments, config_from_args, parse_with_overrides, report_user_errors
from mmpeft.training.metrics import RECALL_AT

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "embedded_retrieval.yaml"


def compare(results: dict) -> str:
    """Zero-shot against fine-tuned recall, one row per split, direction and k."""
    lines = [f"{'split':<6}{'recall':<14}{'zero-shot':>10}{'fine-tuned':>12}"]
    for split in ("eval", "test"):
        before, after = results.get(f"zero_shot_{split}"), results.get(split)
        if before is None or after is None:
            continue
        keys = [f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in RECALL_AT] + ["recall_mean"]
        lines += [f"{split:<6}{key:<14}{before[key]:>10.4f}{after[key]:>12.4f}" for key in keys]
    return "\n".join(lines)


def recipe_config(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parse_with_overrides(parser, argv)
    args.config = args.config or str(DEFAULT_CONFIG)
    args.overrides = ["task=retrieval", *args.overrides]  # any config, read as a retrieval run (its head unused)
    return config_from_args(args)


def recipe_main(argv: list[str] | None = None) -> dict:
    from accelerate import PartialState

    cfg = recipe_config(argv)
    results = train(cfg)
    push_after_training(cfg)  # `hub.push=true`
    if PartialState().is_main_process:
        print(f"\nzero-shot vs fine-tuned\n{compare(results)}")
    return results


if __name__ == "__main__":
    sys.exit(report_user_errors(recipe_main, "lora_retrieval.py"))
