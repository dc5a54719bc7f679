"""Commands that train a run or use one: `train`, `eval`, `predict`, `explain`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import add_backbone_arguments, add_batch_arguments, add_train_arguments, config_from_args


def _train(args: argparse.Namespace) -> int:
    from ..export.hub import push_after_training
    from ..training.loop import train

    cfg = config_from_args(args)
    train(cfg)
    push_after_training(cfg)
    return 0


COLUMN_OPTIONS = {"image": "--image-column", "text": "--text-column", "label": "--label-column"}


def _load_run(args: argparse.Namespace):
    """The saved model `--adapter` names (a run folder, or a Hub repo id at `--revision`) and whether it is a
    retrieval model."""
    from ..models.remote import locate_run
    from ..models.saving import load_adapter, load_retrieval_model, read_manifest

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
    from ..data.manifest import read_split

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
    from ..models.remote import is_repo_id

    if args.output:
        return Path(args.output)
    if is_repo_id(args.adapter):
        return Path(f"eval-{args.adapter.replace('/', '--')}-{Path(args.data).stem}.json")
    return Path(args.adapter) / f"eval-{Path(args.data).stem}.json"


def _eval(args: argparse.Namespace) -> int:
    """Score a saved classifier (report by class) or retrieval model (recall@k both ways) on a manifest."""
    from accelerate import Accelerator

    from ..data.loaders import make_loader
    from ..training.evaluation import evaluate, evaluate_retrieval
    from ..training.metrics import format_report, format_retrieval_report

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
    from ..export.inference import predict, predict_manifest

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


def _explain(args: argparse.Namespace) -> int:
    """Modality contribution, saliency, calibration and errors of a saved classifier, as a report folder."""
    from ..explain.report import check_budget, explain_run, parse_sections
    from ..models.saving import load_adapter

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


def add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a classifier or a retrieval model (`task=`; the same loop as the "
                       "recipes)")
    add_train_arguments(p)
    p.set_defaults(func=_train)


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    """Where the saved model comes from, for every command that takes `--adapter`."""
    p.add_argument("--adapter", required=True, help="output folder of a training run, or a Hub repo id (owner/name) "
                   "it was pushed to (an existing local path wins)")
    p.add_argument("--revision", help="branch, tag or commit of a Hub repo id (default main)")
    add_backbone_arguments(p)
    p.add_argument("--no-verify", action="store_true", help="accept weight files whose SHA-256 differs from the one "
                   "recorded at saving (e.g. an adapter you re-saved with stock peft)")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Reading a manifest whose columns may be named otherwise than in training."""
    p.add_argument("--image-column", help="column holding the image paths (default: the training run's)")
    p.add_argument("--text-column", help="column holding the captions (default: the training run's)")
    p.add_argument("--label-column", help="column holding the labels (default: the training run's)")
    add_batch_arguments(p)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained adapter on a manifest (labelled, or image-caption pairs for "
                       "a retrieval model)")
    add_adapter_arguments(p)
    p.add_argument("--data", required=True, help="CSV / JSONL manifest or datasets folder (with labels for a "
                   "classifier)")
    p.add_argument("--output", help="metrics JSON path (default: <adapter>/eval-<data name>.json; for a repo id "
                   "eval-<owner>--<name>-<data name>.json in the working folder)")
    add_data_arguments(p)
    p.set_defaults(func=_eval)


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify one image + text, or every row of a manifest into a JSONL file")
    add_adapter_arguments(p)
    p.add_argument("--image", help="one image to classify")
    p.add_argument("--text", help="its caption (not needed by the prompt and image_only heads)")
    p.add_argument("--data", help="a CSV / JSONL manifest or datasets folder to classify row by row (labels not "
                   "needed)")
    p.add_argument("--output", help="with --data: the JSONL file to write (row, image, text, label, probabilities)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    add_data_arguments(p)
    p.set_defaults(func=_predict)


def add_explain(sub) -> None:
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
