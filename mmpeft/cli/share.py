"""Commands that publish or reuse a run: `push`, `card`, `merge`, `interpolate`, `inspect`, `embed`, `search`."""

from __future__ import annotations

import argparse
import json

from .common import add_backbone_arguments, add_batch_arguments


def _push(args: argparse.Namespace) -> int:
    from ..export.hub import push

    url = push(args.out_dir, args.repo_id, private=args.private or None, revision=args.revision,
               base_model_id=args.base_model_id, include_checkpoints=args.include_checkpoints,
               include_logs=args.include_logs)
    print(f"pushed {args.out_dir} to {args.repo_id}: {url}")
    return 0


def _card(args: argparse.Namespace) -> int:
    from ..export.card import write_card

    path = write_card(args.out_dir, base_model_id=args.base_model_id, repo_id=args.repo_id, overwrite=args.overwrite)
    print(f"model card written to {path}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from ..export.merge import merge

    report = merge(args.out_dir, args.to, requantize=args.requantize, dtype=args.dtype, overwrite=args.overwrite)
    for key in ("max_abs_diff_full_precision", "max_abs_diff_requantized", "max_abs_diff_dequantized_vs_as_trained"):
        if key in report:
            print(f"{key.removeprefix('max_abs_diff_').replace('_', ' ')}: largest logit difference "
                  f"{report[key]:.3g}")
    print(f"merged model written to {args.to} (loads with transformers' from_pretrained; head and labels with "
          f"mmpeft.load_adapter); report in {args.to}/merge_report.json")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    from ..export.interpolate import interpolate

    record = interpolate(args.out_dir, args.to, args.alpha, overwrite=args.overwrite)
    for part in ("text", "vision", "head"):
        print(f"{part}: {record[part]}")
    print(f"WiSE-FT model at alpha={record['alpha']:g} written to {args.to} (loads with mmpeft.load_adapter)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ..export.inspection import format_inspection, inspect_run

    report = inspect_run(args.out_dir)
    print(json.dumps(report, indent=2) if args.json else format_inspection(report))
    return 0


def _embed(args: argparse.Namespace) -> int:
    from ..export.embed import embed_manifest

    kinds = ("image", "text") if args.what == "both" else (args.what,)
    summary = embed_manifest(args.model, args.data, args.output, kinds=kinds, batch_size=args.batch_size,
                             num_workers=args.num_workers, skip_bad_rows=args.skip_bad_rows,
                             overwrite=args.overwrite, base=args.base, trust_pickle_weights=args.trust_pickle_weights)
    skipped = f"; skipped rows {summary['skipped_rows']}" if summary["skipped_rows"] else ""
    print(f"{summary['rows']} rows embedded ({' and '.join(summary['kinds'])}, {summary['dim']} dimensions) "
          f"to {summary['output']}{skipped}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from ..export.embed import format_hits, search

    hits = search(args.embeddings, text=args.text, image=args.image, k=args.k, model_dir=args.model,
                  trust_pickle_weights=args.trust_pickle_weights)
    print(json.dumps(hits, indent=2) if args.json else format_hits(hits))
    return 0


def add_push(sub) -> None:
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


def add_card(sub) -> None:
    p = sub.add_parser("card", help="write or refresh <run>/README.md, the model card `mmpeft push` uploads")
    p.add_argument("out_dir", help="output folder of a training run")
    p.add_argument("--base-model-id", help="Hub id of the backbone (required for a local path or short name)")
    p.add_argument("--repo-id", help="the repo the card is for (used in its usage examples)")
    p.add_argument("--overwrite", action="store_true", help="replace a README.md that neither mmpeft nor peft wrote")
    p.set_defaults(func=_card)


def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold a trained adapter into its backbone: a standalone transformers folder")
    p.add_argument("out_dir", help="output folder of a training run")
    p.add_argument("--to", required=True, help="folder for the merged model (weights, tokenizer, processor, head)")
    p.add_argument("--requantize", action="store_true",
                   help="quantize the merged weights again as in training (QLoRA runs); the report says the cost")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the merged weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --to folder")
    p.set_defaults(func=_merge)


def add_interpolate(sub) -> None:
    p = sub.add_parser("interpolate", help="WiSE-FT: a run folder whose weights are (1-alpha)*pretrained + "
                       "alpha*fine-tuned (docs/interpolate.md)")
    p.add_argument("out_dir", help="output folder of a training run (classifier)")
    p.add_argument("--alpha", type=float, required=True, help="in [0, 1]: 0 the zero-shot model, 1 the fine-tuned one")
    p.add_argument("--to", required=True, help="folder for the interpolated run (outside the run folder)")
    p.add_argument("--overwrite", action="store_true", help="replace a folder an earlier `mmpeft interpolate` wrote")
    p.set_defaults(func=_interpolate)


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="which modules of each tower got LoRA (ranks, trained weights) and the saved files")
    p.add_argument("out_dir", help="output folder of a training run (or a merged folder)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_inspect)


def add_embed(sub) -> None:
    p = sub.add_parser("embed", help="embed a manifest's images and captions with a retrieval model (safetensors)")
    p.add_argument("model", help="output folder of a retrieval run (task=retrieval)")
    p.add_argument("data", help="CSV / JSONL manifest or datasets folder of images and captions")
    p.add_argument("--what", default="both", choices=["both", "image", "text"], help="which embeddings to write")
    p.add_argument("--output", help="embeddings file (default: <model>/embeddings-<data name>.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing embeddings file")
    add_backbone_arguments(p)
    add_batch_arguments(p)
    p.set_defaults(func=_embed)


def add_search(sub) -> None:
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
