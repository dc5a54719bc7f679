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
    parser.add_argument("--config", help="YAML config (recipes/configs/*.yaml); without it, the embedded default "
                        "(the values of recipes/configs/embedded_sentiment.yaml)")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="drop unreadable or invalid rows and report them (= data.skip_bad_rows=true)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5 model.text.mode=frozen")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None, *,
                         passthrough: bool = False) -> argparse.Namespace:
    """`parse_args`, with `section.key=value` overrides accepted before options too (`a=1 --config x b=2`):
    argparse alone takes the positionals of one run of arguments only and calls the rest unrecognized.
    `passthrough`: a command that declares `passes_unknown_arguments` (`mmpeft bench`) gets the rest as
    `harness_args`."""
    args, extra = parser.parse_known_args(argv)
    if passthrough and extra and getattr(args, "passes_unknown_arguments", False):
        args.harness_args = extra
        return args
    overrides = [x for x in extra if "=" in x and not x.startswith("-")]
    unknown = [x for x in extra if x not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def config_from_args(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, [*args.overrides, *(["data.skip_bad_rows=true"] if args.skip_bad_rows else [])])


def _train(args: argparse.Namespace) -> int:
    from .export.hub import push_after_training
    from .training.loop import train

    cfg = config_from_args(args)
    train(cfg)
    push_after_training(cfg)
    return 0


COLUMN_OPTIONS = {"image": "--image-column", "text": "--text-column", "label": "--label-column"}


def _load_run(args: argparse.Namespace):
    """The saved model `--adapter` names (a run folder, or a Hub repo id at `--revision`) and whether it is a
    retrieval model."""
    from .models.remote import locate_run
    from .models.saving import load_adapter, load_retrieval_model, read_manifest

    folder = locate_run(args.adapter, args.revision)
    retrieval = read_manifest(folder)["config"].get("task") == "retrieval"
    load = load_retrieval_model if retrieval else load_adapter
    model = load(folder, base=args.base, trust_pickle_weights=args.trust_pickle_weights,
                 verify_hashes=not args.no_verify)
    data_cfg = model.config.data
    for role in COLUMN_OPTIONS:  # the manifest's column names, when they differ from training's
        value = getattr(args, f"{role}_column")
        if value:
            setattr(data_cfg, f"{role}_column", value)
    data_cfg.batch_size = args.batch_size or data_cfg.eval_batch_size or data_cfg.batch_size
    data_cfg.num_workers = args.num_workers
    return model, retrieval


def _read_data(args: argparse.Namespace, model, *, labels: bool, label_names, retrieval: bool = False):
    from .data.manifest import read_split

    data_cfg = model.config.data
    split = read_split(args.data, image_column=data_cfg.image_column, text_column=data_cfg.text_column,
                       label_column=data_cfg.label_column, require_labels=labels, label_names=label_names,
                       check_images=data_cfg.check_images, skip_bad_rows=args.skip_bad_rows,
                       allow_outside_root=data_cfg.allow_outside_root,
                       require_text=retrieval or model.config.head.reads_captions, column_options=COLUMN_OPTIONS)
    for row, reason in split.skipped:
        print(f"skipped {args.data} row {row}: {reason}", file=sys.stderr)
    return split


def _eval_output(args: argparse.Namespace) -> Path:
    """Beside a local adapter; in the working folder for a repo id (the Hub cache is not the user's)."""
    from .models.remote import is_repo_id

    if args.output:
        return Path(args.output)
    if is_repo_id(args.adapter):
        return Path(f"eval-{args.adapter.replace('/', '--')}-{Path(args.data).stem}.json")
    return Path(args.adapter) / f"eval-{Path(args.data).stem}.json"


def _eval(args: argparse.Namespace) -> int:
    """Score a saved classifier (report by class) or retrieval model (recall@k both ways) on a manifest."""
    from accelerate import Accelerator

    from .data.loaders import make_loader
    from .training.evaluation import evaluate, evaluate_retrieval
    from .training.metrics import format_report, format_retrieval_report

    model, retrieval = _load_run(args)
    label_names = None if retrieval else model.label_names
    split = _read_data(args, model, labels=not retrieval, label_names=label_names, retrieval=retrieval)
    loader, _ = make_loader(split, label_names, model.source, model.config.data, train=False)
    accelerator = Accelerator()
    model, loader = accelerator.prepare(model, loader)
    if retrieval:
        metrics, report = evaluate_retrieval(model, loader, accelerator), format_retrieval_report
    else:
        metrics, report = evaluate(model, loader, accelerator, label_names), format_report
    metrics["data"] = {"manifest": args.data, "skipped_rows": [{"row": r, "reason": w} for r, w in split.skipped]}
    out = _eval_output(args)
    if accelerator.is_main_process:
        out.write_text(json.dumps(metrics, indent=2))
        print(report(metrics))
        print(f"metrics written to {out}")
    accelerator.end_training()
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .export.inference import predict, predict_manifest

    if (args.image is None) == (args.data is None):
        raise ConfigError("mmpeft predict needs one of --image (one example) or --data MANIFEST --output FILE.jsonl.")
    if args.data is not None and not args.output:
        raise ConfigError("--data needs --output FILE.jsonl: where the predictions go, one line per row.")
    model, retrieval = _load_run(args)
    if retrieval:
        raise ConfigError(f"{args.adapter} is a retrieval model: it ranks captions, it has no classes to predict; "
                          "score it with `mmpeft eval`.")
    if args.data is not None:
        split = _read_data(args, model, labels=False, label_names=None)
        count = predict_manifest(model, split, args.output, overwrite=args.overwrite)
        print(f"{count} predictions written to {args.output}"
              + (f" ({len(split.skipped)} bad rows skipped)" if split.skipped else ""))
        return 0
    if args.text is None and model.config.head.reads_captions:
        raise ConfigError(f"--text is required: the `{model.config.head.type}` head of {args.adapter} reads a caption "
                         "with each image.")
    print(json.dumps(predict(model, [args.image], [args.text or ""])[0], indent=2))
    return 0


def _push(args: argparse.Namespace) -> int:
    from .export.hub import push

    url = push(args.out_dir, args.repo_id, private=args.private or None, revision=args.revision,
               base_model_id=args.base_model_id, include_checkpoints=args.include_checkpoints,
               include_logs=args.include_logs)
    print(f"pushed {args.out_dir} to {args.repo_id}: {url}")
    return 0


def _card(args: argparse.Namespace) -> int:
    from .export.card import write_card

    path = write_card(args.out_dir, base_model_id=args.base_model_id, repo_id=args.repo_id, overwrite=args.overwrite)
    print(f"model card written to {path}")
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


def _inspect(args: argparse.Namespace) -> int:
    from .export.inspection import format_inspection, inspect_run

    report = inspect_run(args.out_dir)
    print(json.dumps(report, indent=2) if args.json else format_inspection(report))
    return 0


def _embed(args: argparse.Namespace) -> int:
    from .export.embed import embed_manifest

    kinds = ("image", "text") if args.what == "both" else (args.what,)
    summary = embed_manifest(args.model, args.data, args.output, kinds=kinds, batch_size=args.batch_size,
                             num_workers=args.num_workers, skip_bad_rows=args.skip_bad_rows,
                             overwrite=args.overwrite, base=args.base, trust_pickle_weights=args.trust_pickle_weights)
    skipped = f"; skipped rows {summary['skipped_rows']}" if summary["skipped_rows"] else ""
    print(f"{summary['rows']} rows embedded ({' and '.join(summary['kinds'])}, {summary['dim']} dimensions) "
          f"to {summary['output']}{skipped}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from .export.embed import format_hits, search

    hits = search(args.embeddings, text=args.text, image=args.image, k=args.k, model_dir=args.model,
                  trust_pickle_weights=args.trust_pickle_weights)
    print(json.dumps(hits, indent=2) if args.json else format_hits(hits))
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


def _explain(args: argparse.Namespace) -> int:
    """Modality contribution, saliency, calibration and errors of a saved classifier, as a report folder."""
    from .explain.report import check_budget, explain_run, parse_sections
    from .models.saving import load_adapter

    parse_sections(args.methods)  # bad flags fail before the model loads
    check_budget(examples=args.examples, permutations=args.permutations,
                 shapley_permutations=args.shapley_permutations, shapley_examples=args.shapley_examples,
                 image_baseline=args.image_baseline)
    model = load_adapter(args.adapter, base=args.base, trust_pickle_weights=args.trust_pickle_weights)
    out = args.out or str(Path(args.adapter) / "explain")
    result = explain_run(model, args.data, out, examples=args.examples, methods=args.methods,
                         rows=tuple(args.rows or ()), permutations=args.permutations,
                         shapley_permutations=args.shapley_permutations, shapley_examples=args.shapley_examples,
                         image_baseline=args.image_baseline, batch_size=args.batch_size, seed=args.seed,
                         progress=not args.no_progress, overwrite=args.overwrite, group_column=args.group_column)
    print(f"report written to {out}/report.md ({len(result['figures'])} figures, every number in {out}/explain.json;"
          f" {result['seconds']} s)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare.runner import run_from_args

    return run_from_args(args)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a classifier or a retrieval model (`task=`; the same loop as the "
                       "recipes)")
    add_train_arguments(p)
    p.set_defaults(func=_train)


def _add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    """Where the saved model comes from, for every command that takes `--adapter`."""
    p.add_argument("--adapter", required=True, help="output folder of a training run, or a Hub repo id (owner/name) "
                   "it was pushed to (an existing local path wins)")
    p.add_argument("--revision", help="branch, tag or commit of a Hub repo id (default main)")
    p.add_argument("--base", help="load the backbone from here instead of the recorded name")
    p.add_argument("--trust-pickle-weights", action="store_true",
                   help="also read a backbone stored as pytorch_model.bin (with torch.load weights_only=True)")
    p.add_argument("--no-verify", action="store_true", help="accept weight files whose SHA-256 differs from the one "
                   "recorded at saving (e.g. an adapter you re-saved with stock peft)")


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Reading a manifest whose columns may be named otherwise than in training."""
    p.add_argument("--image-column", help="column holding the image paths (default: the training run's)")
    p.add_argument("--text-column", help="column holding the captions (default: the training run's)")
    p.add_argument("--label-column", help="column holding the labels (default: the training run's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip unreadable rows and report them")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained adapter on a manifest (labelled, or image-caption pairs for "
                       "a retrieval model)")
    _add_adapter_arguments(p)
    p.add_argument("--data", required=True, help="CSV / JSONL manifest or datasets folder (with labels for a "
                   "classifier)")
    p.add_argument("--output", help="metrics JSON path (default: <adapter>/eval-<data name>.json; for a repo id "
                   "eval-<owner>--<name>-<data name>.json in the working folder)")
    _add_data_arguments(p)
    p.set_defaults(func=_eval)


def _add_manifest_run_args(p) -> None:
    """Where a saved model's backbone comes from, and how a manifest is read and batched (embed; main's
    `_add_adapter_arguments` / `_add_data_arguments` replace it when this branch merges)."""
    p.add_argument("--base", help="load the backbone from here instead of the recorded name")
    p.add_argument("--trust-pickle-weights", action="store_true",
                   help="also read a backbone stored as pytorch_model.bin (with torch.load weights_only=True)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip unreadable rows and report them")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify one image + text, or every row of a manifest into a JSONL file")
    _add_adapter_arguments(p)
    p.add_argument("--image", help="one image to classify")
    p.add_argument("--text", help="its caption (not needed by the prompt and image_only heads)")
    p.add_argument("--data", help="a CSV / JSONL manifest or datasets folder to classify row by row (labels not "
                   "needed)")
    p.add_argument("--output", help="with --data: the JSONL file to write (row, image, text, label, probabilities)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    _add_data_arguments(p)
    p.set_defaults(func=_predict)


def _add_push(sub) -> None:
    p = sub.add_parser("push", help="publish a run folder on the Hugging Face Hub in one commit (adapter, head, "
                       "labels, run record, config, metrics, charts, model card)")
    p.add_argument("out_dir", help="output folder of a training run")
    p.add_argument("--repo-id", required=True, help="owner/name of the model repo (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to commit to (created from main if new; default main)")
    p.add_argument("--base-model-id", help="Hub id of the backbone the run trained on; required when the run "
                   "recorded a local path or short name")
    p.add_argument("--include-checkpoints", action="store_true", help="also upload checkpoints/")
    p.add_argument("--include-logs", action="store_true", help="also upload logs/ and log.txt")
    p.set_defaults(func=_push)


def _add_card(sub) -> None:
    p = sub.add_parser("card", help="write or refresh <run>/README.md, the model card `mmpeft push` uploads")
    p.add_argument("out_dir", help="output folder of a training run")
    p.add_argument("--base-model-id", help="Hub id of the backbone (required for a local path or short name)")
    p.add_argument("--repo-id", help="the repo the card is for (used in its usage examples)")
    p.add_argument("--overwrite", action="store_true", help="replace a README.md that neither mmpeft nor peft wrote")
    p.set_defaults(func=_card)


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


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="how much each modality decides, saliency maps, calibration and errors of a "
                       "trained classifier: report.md + PNGs + explain.json")
    p.add_argument("--adapter", required=True, help="output folder of a training run")
    p.add_argument("--data", required=True, help="labelled CSV / JSONL manifest or datasets folder")
    p.add_argument("--out", help="report folder (default: <adapter>/explain)")
    p.add_argument("--examples", type=int, default=12, help="saliency gallery size: half most confident correct, "
                   "half most confident wrong (default 12)")
    p.add_argument("--methods", default="all", help="report sections: all, or a comma list of contribution, "
                   "saliency, calibration")
    p.add_argument("--rows", type=int, nargs="*", help="manifest rows (line numbers) to show saliency for as well")
    p.add_argument("--permutations", type=int, default=10, help="permutations per modality (default 10)")
    p.add_argument("--shapley-permutations", type=int, default=8,
                   help="sampled permutations per example for the Shapley shares; 0 skips them (default 8)")
    p.add_argument("--shapley-examples", type=int, default=300,
                   help="examples the Shapley shares are estimated on, a seeded sample (default 300)")
    p.add_argument("--image-baseline", default="mean", choices=["mean", "data"],
                   help="what a masked image patch group shows: the processor's mean pixel (MM-SHAP) or the same "
                   "region of another image of the split")
    p.add_argument("--group-column", default="decided_by", help="manifest column to break results down by, when "
                   "present (default decided_by, the embedded world's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", help="load the backbone from here instead of the recorded name")
    p.add_argument("--trust-pickle-weights", action="store_true",
                   help="also read a backbone stored as pytorch_model.bin (with torch.load weights_only=True)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_explain)


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


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="which modules of each tower got LoRA (ranks, trained weights) and the saved files")
    p.add_argument("out_dir", help="output folder of a training run (or a merged folder)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_inspect)


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="embed a manifest's images and captions with a retrieval model (safetensors)")
    p.add_argument("model", help="output folder of a retrieval run (task=retrieval)")
    p.add_argument("data", help="CSV / JSONL manifest or datasets folder of images and captions")
    p.add_argument("--what", default="both", choices=["both", "image", "text"], help="which embeddings to write")
    p.add_argument("--output", help="embeddings file (default: <model>/embeddings-<data name>.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing embeddings file")
    _add_manifest_run_args(p)
    p.set_defaults(func=_embed)


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="nearest images to a caption, or captions to an image, in an embeddings file")
    p.add_argument("embeddings", help="file written by `mmpeft embed` (or the folder holding one)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a caption: find the closest images")
    query.add_argument("--image", help="an image file: find the closest captions")
    p.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    p.add_argument("--model", help="retrieval run to embed the query with (default: the one recorded in the file)")
    p.add_argument("--trust-pickle-weights", action="store_true",
                   help="also read a backbone stored as pytorch_model.bin (with torch.load weights_only=True)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_search)


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
COMMANDS = (_add_train, _add_eval, _add_predict, _add_push, _add_card, _add_data, _add_compare, _add_explain,
            _add_backbones, _add_merge, _add_plan, _add_inspect, _add_embed, _add_search, _add_bench)


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
    args = parse_with_overrides(parser, argv, passthrough=True)
    return report_user_errors(lambda: args.func(args), f"mmpeft {args.command}")


if __name__ == "__main__":
    sys.exit(main())
