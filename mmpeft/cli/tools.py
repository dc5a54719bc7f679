"""Commands around the runs: `data make-*`, `compare`, `backbones`, `plan`, `bench`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MissingPathError, PathExistsError

# The speed harness compares mmpeft with the plain loop of ANCHORS §1, which is a reference, not library code: both
# live in the repository's benchmarks/ folder (a source checkout), never in the installed package.
SPEED_HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"


def _backbones(args: argparse.Namespace) -> int:
    from ..backbones import list_backbones

    rows = list_backbones()
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        print(f"{row['name']:<{width}}  {row['kind']:<10}  {row['description']}  (e.g. {row['example']})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Run benchmarks/speed.py of this source checkout with the given arguments; its exit code is ours."""
    import subprocess

    if not SPEED_HARNESS.is_file():
        raise MissingPathError(f"`mmpeft bench` runs {SPEED_HARNESS}, which only a source checkout of mmpeft has "
                               "(the plain reference loop is not part of the installed package). Clone the "
                               "repository and run `pip install -e .` there, or run `python benchmarks/speed.py`.")
    return subprocess.run([sys.executable, str(SPEED_HARNESS), *args.harness_args]).returncode


def _plan(args: argparse.Namespace) -> int:
    from ..plan import format_plan, plan

    estimates = plan(args.model, bits=args.bits, batch=args.batch, text_tokens=args.tokens,
                     gradient_checkpointing=args.grad_checkpointing, optimizer=args.optimizer, device=args.device)
    print(f"{args.model}, batch {args.batch}, {estimates[0].parts['text_tokens']} text tokens, gradient "
          f"checkpointing {'on' if args.grad_checkpointing else 'off'}, optimizer {args.optimizer} "
          f"(estimated peak on {args.device})")
    print(format_plan(estimates, device=args.device, bits=args.bits))
    return 0


def _write_world_set(out_dir: str, write) -> dict[str, Path]:
    """Run a world writer into `out_dir` (refusing a folder with other files in it) and list what it wrote."""
    from ..world.files import MARKER

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise PathExistsError(f"{out} is not empty and holds no world data set; choose an empty or new folder.")
    paths = write(out)
    for split, path in paths.items():
        print(f"{split}: {path} ({len(path.read_text(encoding='utf-8').splitlines())} examples)")
    return paths


def _make_sentiment(args: argparse.Namespace) -> int:
    from ..world.sentiment import write_sentiment

    sizes = {"train": args.train, "val": args.val, "test": args.test}
    paths = _write_world_set(args.out_dir, lambda out: write_sentiment(out, seed=args.seed, sizes=sizes))
    print(f"train on it: mmpeft train data.train={paths['train']} data.eval={paths['val']} data.test={paths['test']}")
    return 0


def _make_fewshot(args: argparse.Namespace) -> int:
    from ..world.fewshot import write_fewshot

    _write_world_set(args.out_dir, lambda out: write_fewshot(out, attribute=args.attribute, shots=args.shots,
                                                             seed=args.seed))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ..compare.runner import run_from_args

    return run_from_args(args)


def add_data(sub) -> None:
    data = sub.add_parser("data", help="write the built-in world's data sets as JPEG files + JSONL manifests")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("make-sentiment", help="multimodal sentiment (positive / neutral / negative) where the "
                            "label needs image and text; the format your own data should take")
    p.add_argument("out_dir", help="an empty or new folder (or one this command wrote before)")
    p.add_argument("--seed", type=int, default=0, help="which scenes and posts are drawn (default 0)")
    p.add_argument("--train", type=int, default=1200, help="training examples (default 1200)")
    p.add_argument("--val", type=int, default=300, help="validation examples (default 300)")
    p.add_argument("--test", type=int, default=600, help="test examples (default 600)")
    p.set_defaults(func=_make_sentiment)
    p = data_sub.add_parser("make-fewshot", help="k-shot image classification of one world attribute")
    p.add_argument("out_dir", help="an empty or new folder (or one this command wrote before)")
    p.add_argument("--attribute", default="shape", choices=["shape", "colour", "weather"])
    p.add_argument("--shots", type=int, default=4, help="training examples per class (default 4)")
    p.add_argument("--seed", type=int, default=0, help="which examples are drawn (default 0)")
    p.set_defaults(func=_make_fewshot)


def add_compare(sub) -> None:
    from ..compare.runner import add_compare_arguments

    p = sub.add_parser("compare", help="linear probe, LoRA per tower, full fine-tuning and baselines side by side, "
                       "each in a fresh process (the same as recipes/compare.py)")
    add_compare_arguments(p)
    p.set_defaults(func=_compare)


def add_backbones(sub) -> None:
    p = sub.add_parser("backbones", help="list supported backbone families and short names")
    p.set_defaults(func=_backbones)


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="estimate peak memory of full / LoRA / QLoRA and which GPUs fit")
    p.add_argument("--model", required=True, help="Hub id, local folder or known name (e.g. openai/clip-vit-base-patch16)")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8], help="QLoRA bits")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, help="text tokens per example (default: the family's length, at most 77)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit", "paged_adamw_8bit"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: tensor memory plus CUDA context; cpu: resident set with the imported libraries")
    p.set_defaults(func=_plan)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", add_help=False,
                       help="mmpeft's training step beside the plain transformers + peft loop, A B A B "
                       "(benchmarks/speed.py of a source checkout; `mmpeft bench --help` lists its options)")
    p.set_defaults(func=_bench, harness_args=[], passes_unknown_arguments=True)  # all of them go to speed.py
