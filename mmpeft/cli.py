"""`mmpeft` command line: one `_add_<command>` function per command (its arguments) and one `_<command>` that runs
it; user errors (`MmpeftError`) print their message and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, MissingPathError, MmpeftError, PathExistsError

# The speed harness compares mmpeft with the plain loop of ANCHORS §1, which is a reference, not library code: both
# live in the repository's benchmarks/ folder (a source checkout), never in the installed package.
SPEED_HARNESS = Path(__file__).resolve().parent.parent / "benchmarks" / "speed.py"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The training command line, shared by `mmpeft train` and the recipes."""
    parser.add_argument("--config", help="YAML config (recipes/configs/*.yaml); defaults otherwise")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="drop unreadable or invalid rows and report them (= data.skip_bad_rows=true)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5 model.text.mode=frozen")


def config_from_args(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, [*args.overrides, *(["data.skip_bad_rows=true"] if args.skip_bad_rows else [])])


def _train(args: argparse.Namespace) -> int:
    from .training.loop import train

    train(config_from_args(args))
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Score a saved classifier (report by class) or retrieval model (recall@k both ways) on a manifest."""
    from accelerate import Accelerator

    from .data.loaders import make_loader
    from .data.manifest import read_split
    from .models.retrieval import evaluate_retrieval, format_retrieval_report
    from .models.saving import load_adapter, load_retrieval_model, read_manifest
    from .training.evaluation import evaluate
    from .training.metrics import format_report

    retrieval = read_manifest(args.adapter)["config"].get("task") == "retrieval"
    load = load_retrieval_model if retrieval else load_adapter
    model = load(args.adapter, base=args.base, trust_pickle_weights=args.trust_pickle_weights)
    data_cfg = model.config.data
    data_cfg.batch_size = args.batch_size or data_cfg.eval_batch_size or data_cfg.batch_size
    data_cfg.num_workers = args.num_workers
    label_names = None if retrieval else model.label_names
    split = read_split(args.data, image_column=data_cfg.image_column, text_column=data_cfg.text_column,
                       label_column=data_cfg.label_column, require_labels=not retrieval, label_names=label_names,
                       check_images=data_cfg.check_images, skip_bad_rows=args.skip_bad_rows,
                       allow_outside_root=data_cfg.allow_outside_root,
                       require_text=retrieval or model.config.head.reads_captions)
    loader, _ = make_loader(split, label_names, model.source, data_cfg, train=False)
    accelerator = Accelerator()
    model, loader = accelerator.prepare(model, loader)
    if retrieval:
        metrics, report = evaluate_retrieval(model, loader, accelerator), format_retrieval_report
    else:
        metrics, report = evaluate(model, loader, accelerator, label_names), format_report
    metrics["data"] = {"manifest": args.data, "skipped_rows": [{"row": r, "reason": w} for r, w in split.skipped]}
    out = Path(args.output or Path(args.adapter) / f"eval-{Path(args.data).stem}.json")
    if accelerator.is_main_process:
        out.write_text(json.dumps(metrics, indent=2))
        print(report(metrics))
        print(f"metrics written to {out}")
    accelerator.end_training()
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .export.inference import predict
    from .models.saving import load_adapter

    model = load_adapter(args.adapter, base=args.base, trust_pickle_weights=args.trust_pickle_weights)
    if args.text is None and model.config.head.reads_captions:
        raise ConfigError(f"--text is required: the `{model.config.head.type}` head of {args.adapter} reads a caption "
                         "with each image.")
    probs = predict(model, [args.image], [args.text or ""])[0]
    ranked = sorted(zip(model.label_names, probs.tolist()), key=lambda x: -x[1])
    print(json.dumps({"label": ranked[0][0], "probabilities": dict(ranked)}, indent=2))
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from .backbones import list_backbones

    rows = list_backbones()
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        print(f"{row['name']:<{width}}  {row['kind']:<10}  {row['description']}  (e.g. {row['example']})")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .export.merge import merge

    report = merge(args.out_dir, args.to, requantize=args.requantize, dtype=args.dtype, overwrite=args.overwrite)
    for key in ("max_abs_diff_full_precision", "max_abs_diff_requantized", "max_abs_diff_dequantized_vs_as_trained"):
        if key in report:
            print(f"{key.removeprefix('max_abs_diff_').replace('_', ' ')}: largest logit difference "
                  f"{report[key]:.3g}")
    print(f"merged model written to {args.to} (loads with transformers' from_pretrained; head and labels with "
          f"mmpeft.load_adapter); report in {args.to}/merge_report.json")
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
    from .plan import format_plan, plan

    estimates = plan(args.model, bits=args.bits, batch=args.batch, text_tokens=args.tokens,
                     gradient_checkpointing=args.grad_checkpointing, optimizer=args.optimizer, device=args.device)
    print(f"{args.model}, batch {args.batch}, {estimates[0].parts['text_tokens']} text tokens, gradient "
          f"checkpointing {'on' if args.grad_checkpointing else 'off'}, optimizer {args.optimizer} "
          f"(estimated peak on {args.device})")
    print(format_plan(estimates, device=args.device, bits=args.bits))
    return 0


def _write_world_set(out_dir: str, write) -> dict[str, Path]:
    """Run a world writer into `out_dir` (refusing a folder with other files in it) and list what it wrote."""
    from .world.files import MARKER

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise PathExistsError(f"{out} is not empty and holds no world data set; choose an empty or new folder.")
    paths = write(out)
    for split, path in paths.items():
        print(f"{split}: {path} ({len(path.read_text(encoding='utf-8').splitlines())} examples)")
    return paths


def _make_sentiment(args: argparse.Namespace) -> int:
    from .world.sentiment import write_sentiment

    sizes = {"train": args.train, "val": args.val, "test": args.test}
    paths = _write_world_set(args.out_dir, lambda out: write_sentiment(out, seed=args.seed, sizes=sizes))
    print(f"train on it: mmpeft train data.train={paths['train']} data.eval={paths['val']} data.test={paths['test']}")
    return 0


def _make_fewshot(args: argparse.Namespace) -> int:
    from .world.fewshot import write_fewshot

    _write_world_set(args.out_dir, lambda out: write_fewshot(out, attribute=args.attribute, shots=args.shots,
                                                             seed=args.seed))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare.runner import run_from_args

    return run_from_args(args)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a classifier or a retrieval model (`task=`; the same loop as the "
                       "recipes)")
    add_train_arguments(p)
    p.set_defaults(func=_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained adapter on a manifest (labelled, or image-caption pairs for "
                       "a retrieval model)")
    p.add_argument("--adapter", required=True, help="output folder of a training run")
    p.add_argument("--data", required=True, help="CSV / JSONL manifest or datasets folder (with labels for a "
                   "classifier)")
    p.add_argument("--base", help="load the backbone from here instead of the recorded name")
    p.add_argument("--trust-pickle-weights", action="store_true",
                   help="also read a backbone stored as pytorch_model.bin (with torch.load weights_only=True)")
    p.add_argument("--output", help="metrics JSON path (default: <adapter>/eval-<data name>.json)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip unreadable rows and report them")
    p.set_defaults(func=_eval)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify one image + text")
    p.add_argument("--adapter", required=True, help="output folder of a training run")
    p.add_argument("--image", required=True)
    p.add_argument("--text", help="the caption (not needed by the prompt and image_only heads)")
    p.add_argument("--base", help="load the backbone from here instead of the recorded name")
    p.add_argument("--trust-pickle-weights", action="store_true",
                   help="also read a backbone stored as pytorch_model.bin (with torch.load weights_only=True)")
    p.set_defaults(func=_predict)


def _add_data(sub) -> None:
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


def _add_compare(sub) -> None:
    from .compare.runner import add_compare_arguments

    p = sub.add_parser("compare", help="linear probe, LoRA per tower, full fine-tuning and baselines side by side, "
                       "each in a fresh process (the same as recipes/compare.py)")
    add_compare_arguments(p)
    p.set_defaults(func=_compare)


def _add_backbones(sub) -> None:
    p = sub.add_parser("backbones", help="list supported backbone families and short names")
    p.set_defaults(func=_backbones)


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold a trained adapter into its backbone: a standalone transformers folder")
    p.add_argument("out_dir", help="output folder of a training run")
    p.add_argument("--to", required=True, help="folder for the merged model (weights, tokenizer, processor, head)")
    p.add_argument("--requantize", action="store_true",
                   help="quantize the merged weights again as in training (QLoRA runs); the report says the cost")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the merged weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --to folder")
    p.set_defaults(func=_merge)


def _add_plan(sub) -> None:
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


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", add_help=False,
                       help="mmpeft's training step beside the plain transformers + peft loop, A B A B "
                       "(benchmarks/speed.py of a source checkout; `mmpeft bench --help` lists its options)")
    p.set_defaults(func=_bench, harness_args=[], passes_unknown_arguments=True)  # all of them go to speed.py


# One function per command: each adds its sub-parser (help, arguments) and the function that runs it.
COMMANDS = (_add_train, _add_eval, _add_predict, _add_data, _add_compare, _add_backbones, _add_merge, _add_plan,
            _add_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpeft", description="Fine-tune vision-language dual encoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def report_user_errors(run, prog: str) -> int:
    """Run `run()`; an error the user can fix (`MmpeftError`: config, data, path, checkpoint, ...) prints its message
    without a traceback and exits 2. Anything else is a bug or comes from inside a library: its traceback stays.

    An int that `run()` returns is the exit code (e.g. `mmpeft compare`: 1 when a run failed); anything else is 0.
    """
    try:
        result = run()
    except MmpeftError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "passes_unknown_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:
        args.harness_args = unknown
    return report_user_errors(lambda: args.func(args), f"mmpeft {args.command}")


if __name__ == "__main__":
    sys.exit(main())
