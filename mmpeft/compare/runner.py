"""Fine-tuning configurations side by side on one task, seed and budget, each run in a fresh process.

    python recipes/compare.py --task sentiment --quick
    mmpeft compare --task fewshot --shots 1,2,4,8,16 --seeds 0,1,2 --out out/compare-fewshot

Every (configuration, shots, seed) is one `mmpeft train` in its own subprocess, so the peak memory it reports
belongs to that run alone: on CPU the peak resident set of that process (`os.wait4`'s rusage, taken by a
bare launcher: see `run_child`), on CUDA the run's own `torch.cuda.max_memory_allocated`.
A configuration with nothing to train (few-shot `zero_shot`) is evaluated as built (`train.evaluate_only=true`).
A failed run is recorded with the end of its log and the comparison goes on. Here: the named configurations,
the data of each (shots, seed), the loop over runs and the command line; charts and tables: `compare_report`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path

from ..errors import ConfigError

TASKS = ("sentiment", "fewshot", "position")

_FROZEN = ["model.text.mode=frozen", "model.vision.mode=frozen"]
_LORA_BOTH = ["model.text.mode=lora", "model.vision.mode=lora"]
# The regularizers the brief names, together; `*_reg` beside `lora_both` shows what they do at small k.
_REGULARIZE = ["train.weight_decay=0.1", "train.label_smoothing=0.1", "model.text.lora.dropout=0.2",
               "model.vision.lora.dropout=0.2", "data.augment.enabled=true"]
_TEXT_AUGMENT = ["data.augment.word_dropout=0.1", "data.augment.synonym_swap=0.2"]

CONFIGS = {
    "sentiment": {
        "linear_probe": [*_FROZEN, "head.mode=full"],
        "lora_both": [*_LORA_BOTH],
        "lora_text": ["model.text.mode=lora", "model.vision.mode=frozen"],
        "lora_vision": ["model.text.mode=frozen", "model.vision.mode=lora"],
        "full": ["model.text.mode=full", "model.vision.mode=full"],
        "text_only": ["head.type=text_only", "model.text.mode=lora", "model.vision.mode=frozen"],
        "image_only": ["head.type=image_only", "model.text.mode=frozen", "model.vision.mode=lora"],
        "lora_both_reg": [*_LORA_BOTH, *_REGULARIZE, *_TEXT_AUGMENT],
        # the same recipe from random weights: what pretraining is worth
        "lora_both_random": [*_LORA_BOTH, "model.name=tiny-clip-random"],
    },
    "fewshot": {  # the prompt head: class names as prompts; no captions, so no text augmentation
        "zero_shot": [*_FROZEN, "head.mode=frozen", "train.evaluate_only=true"],
        "linear_probe": [*_FROZEN, "head.mode=full"],  # class embeddings (from the prompts) and the scale train
        "lora_both": [*_LORA_BOTH],
        "lora_text": ["model.text.mode=lora", "model.vision.mode=frozen"],
        "lora_vision": ["model.text.mode=frozen", "model.vision.mode=lora"],
        "full": ["model.text.mode=full", "model.vision.mode=full"],
        "lora_both_reg": [*_LORA_BOTH, *_REGULARIZE],
    },
    "position": {  # the label is where the objects are, which the frozen checkpoint cannot read
        "linear_probe": [*_FROZEN, "head.mode=full"],
        "lora_text": ["model.text.mode=lora", "model.vision.mode=frozen"],
        "lora_vision": ["model.text.mode=frozen", "model.vision.mode=lora"],
        "full": ["model.text.mode=full", "model.vision.mode=full"],
    },
}
# Applied before each configuration's overrides; the same for every configuration of a task.
TASK_OVERRIDES = {
    "sentiment": ["train.tracker=null"],
    # One step budget for every k (`max_steps`: exactly that many steps, however many epochs that takes; an epoch
    # is a single batch at k=1); the validation split picks the best step.
    "fewshot": ["head.type=prompt", "head.mode=full", "train.tracker=null", "train.max_steps=200", "train.eval_every=20", "data.batch_size=32", "data.num_workers=0"],
    # A longer fixed budget: the cue has to be learnt, not read off pretrained features; full fine-tuning at the
    # learning rate this 1.8M-parameter checkpoint was pretrained near (2e-5 leaves it where it started).
    "position": ["train.tracker=null", "train.max_steps=300", "train.eval_every=50", "data.batch_size=32",
                 "data.num_workers=0", "train.lr_full=1e-3"],
}
QUICK_OVERRIDES = ["train.max_steps=4", "train.eval_every=4", "data.num_workers=0"]
QUICK_SENTIMENT_SIZES = {"train": 96, "val": 48, "test": 96}
QUICK_FEWSHOT_SPLITS = {"val_per_class": 4, "test_per_class": 10}
DEFAULT_SHOTS = {"sentiment": None, "fewshot": (1, 2, 4, 8, 16), "position": None}
QUICK_POSITION_PER_CLASS = {"train": 16, "val": 4, "test": 10}


def plan_configs(task: str, names: list[str] | None = None, defined: dict[str, list[str]] | None = None
                 ) -> dict[str, list[str]]:
    """The named configurations to run (all of the task's by default) plus user-defined ones, in order."""
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {list(TASKS)}, got {task!r}.")
    known = {**CONFIGS[task], **(defined or {})}
    if names is None:
        return known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"Unknown configuration(s) {unknown} for --task {task}; known: {list(known)} "
                         "(define more with --define 'name: key=value ...').")
    return {n: known[n] for n in names}


def subsample_manifest(src: str | Path, dst: Path, *, shots: int, seed: int, label_column: str = "label",
                       image_column: str = "image") -> Path:
    """`shots` rows per label of a JSONL manifest, drawn by `seed`, with absolute image paths (CLIP-LoRA's k-shot)."""
    src = Path(src)
    if src.suffix != ".jsonl":
        raise ConfigError(f"--shots with --task sentiment needs a JSONL training manifest, got {src}.")
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(str(row[label_column]), []).append(row)
    short = {label: len(r) for label, r in by_label.items() if len(r) < shots}
    if short:
        raise ConfigError(f"{src}: --shots {shots} needs {shots} examples of every label; these have fewer: {short}.")
    rng = random.Random(f"sentiment-shots-{seed}")
    chosen = [row for label in sorted(by_label) for row in rng.sample(by_label[label], shots)]
    for row in chosen:
        row[image_column] = str((src.parent / row[image_column]).resolve())
    dst.mkdir(parents=True, exist_ok=True)
    path = dst / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in chosen), encoding="utf-8")
    return path


def prepare_data(task: str, out: Path, base: str | None, extra: list[str], shots: list[int | None],
                 seeds: list[int], *, quick: bool, attribute: str = "shape") -> dict[tuple, list[str]]:
    """Write the data every (shots, seed) needs, before any run starts; returns their `data.*` overrides."""
    from ..config import load_config

    data: dict[tuple, list[str]] = {}
    if task == "fewshot":
        from ..world.fewshot import write_fewshot

        for k in shots:
            for seed in seeds:
                paths = write_fewshot(out / "data" / f"{attribute}-k{k}-seed{seed}", attribute=attribute, shots=k,
                                      seed=seed, **(QUICK_FEWSHOT_SPLITS if quick else {}))
                data[k, seed] = [f"data.train={paths['train']}", f"data.eval={paths['val']}",
                                 f"data.test={paths['test']}"]
        return data
    if not quick and shots == [None] and task == "sentiment":
        return {(None, seed): [] for seed in seeds}  # the base's own data
    cfg = load_config(base, [*TASK_OVERRIDES[task], *extra])
    if task == "position":
        from ..world.position import write_position

        paths = write_position(out / "data" / ("position-quick" if quick else "position"),
                               per_class=QUICK_POSITION_PER_CLASS if quick else None)
        manifests = {"train": str(paths["train"]), "eval": str(paths["val"]), "test": str(paths["test"])}
    elif quick and cfg.data.train is None:  # the embedded set, smaller
        from ..world.sentiment import write_sentiment

        paths = write_sentiment(out / "data" / "sentiment-quick", sizes=QUICK_SENTIMENT_SIZES)
        manifests = {"train": str(paths["train"]), "eval": str(paths["val"]), "test": str(paths["test"])}
    else:
        from ..data.loaders import manifest_paths

        manifests = manifest_paths(cfg.data)
    for k in shots:
        for seed in seeds:
            if k is None:
                data[k, seed] = [f"data.{name}={path}" for name, path in manifests.items()]
                continue
            train = subsample_manifest(manifests["train"], out / "data" / f"{task}-k{k}-seed{seed}", shots=k,
                                       seed=seed, label_column=cfg.data.label_column,
                                       image_column=cfg.data.image_column)
            data[k, seed] = [f"data.train={train}", "data.allow_outside_root=true",
                             *(f"data.{name}={manifests[name]}" for name in ("eval", "test") if name in manifests)]
    return data


# --- the whole comparison --------------------------------------------------------------------------------------------


def _meta(task: str, base: str | None, extra: list[str], quick: bool, cuda: bool) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5, check=False).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    cpu = f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return {"task": task, "base": base, "extra_overrides": extra, "quick": quick,
            "task_overrides": TASK_OVERRIDES[task], "quick_overrides": QUICK_OVERRIDES if quick else [],
            "device": torch.cuda.get_device_name(0) if cuda else cpu,
            "memory": "torch.cuda.max_memory_allocated of each run" if cuda else
                      "peak resident set of each run's own process (os.wait4)",
            "git_commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def compare(task: str, out: str | Path, *, configs: dict[str, list[str]] | None = None,
            shots: list[int] | None = None, seeds: list[int] = (0,), base: str | None = None,
            extra: list[str] = (), quick: bool = False, attribute: str = "shape", timeout: float | None = None,
            log=print) -> dict:
    """Run every configuration over shots and seeds; write results.json, results.md and the charts into `out`."""
    import torch

    from .child import run_one
    from .report import write_report

    out = Path(out)
    configs = plan_configs(task) if configs is None else configs
    shots_list: list[int | None] = list(shots) if shots else [None]
    if task == "fewshot" and shots_list == [None]:
        raise ConfigError("--task fewshot needs --shots (e.g. 1,2,4,8,16).")
    extra, seeds = list(extra), list(seeds)
    cuda = torch.cuda.is_available()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(task, out, base, extra, shots_list, seeds, quick=quick, attribute=attribute)
    results = {"meta": {**_meta(task, base, extra, quick, cuda), "configs": configs, "shots": shots_list,
                        "seeds": seeds, "attribute": attribute if task == "fewshot" else None}, "runs": []}
    total, done = len(configs) * len(shots_list) * len(seeds), 0
    for k in shots_list:
        for name, config_overrides in configs.items():
            for seed in seeds:
                run_dir = out / "runs" / name / f"{'all' if k is None else f'k{k}'}-seed{seed}"
                overrides = [*TASK_OVERRIDES[task], *(QUICK_OVERRIDES if quick else []), *config_overrides,
                             *data[k, seed], *extra]
                record = run_one(name, overrides, run_dir, base=base, seed=seed, shots=k, cuda=cuda,
                                 timeout=timeout, comparison=out)
                results["runs"].append(record)
                done += 1
                (out / "results.json").write_text(json.dumps(results, indent=2))  # partial results survive
                shot = "" if k is None else f" k={k}"
                if record["status"] == "ok":
                    log(f"[{done}/{total}] {name}{shot} seed {seed}: test macro-F1 {record['test_macro_f1']:.4f}, "
                        f"{record['train_seconds']:.1f} s, peak {record['peak_memory_gib']:.2f} GiB")
                else:
                    log(f"[{done}/{total}] {name}{shot} seed {seed}: FAILED: "
                        f"{(record['error'] or '').splitlines()[-1] if record['error'] else ''}")
    results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    results["written"] = [str(p) for p in write_report(results, out)]
    return results


# --- command line (recipes/compare.py and `mmpeft compare`) --------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _definition(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition(":")
    if not sep or not name.strip() or not rest.split():
        raise argparse.ArgumentTypeError(f"expected 'name: key=value key=value ...', got {text!r}")
    return name.strip(), rest.split()


def add_compare_arguments(parser: argparse.ArgumentParser, default_base: str | None = None) -> None:
    """The comparison's command line, shared by `mmpeft compare` and recipes/compare.py."""
    parser.add_argument("--task", choices=TASKS, default="sentiment",
                        help="sentiment: image+text classification (fusion heads); fewshot: k-shot image "
                             "classification of a world attribute with the prompt head; position: where the "
                             "objects are, which the pretrained tiny CLIP cannot read (mmpeft/world/position.py)")
    parser.add_argument("--configs", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        help=f"comma-separated subset; sentiment: {', '.join(CONFIGS['sentiment'])}; "
                             f"fewshot: {', '.join(CONFIGS['fewshot'])} (default: all of the task's)")
    parser.add_argument("--define", action="append", type=_definition, default=[], metavar="'NAME: K=V ...'",
                        help="an extra configuration as overrides (repeatable); run by default with the others")
    parser.add_argument("--shots", type=_ints, help="k examples per class, e.g. 1,2,4,8,16 (fewshot default; "
                        "with sentiment: a k-shot subset of the training manifest)")
    parser.add_argument("--seeds", type=_ints, help="default 0,1,2 (0 with --quick)")
    parser.add_argument("--attribute", default="shape", choices=["shape", "colour", "weather"],
                        help="fewshot: the world attribute to classify")
    parser.add_argument("--out", default="out/compare", help="output folder (runs/, data/, results.*, *.png)")
    parser.add_argument("--base", default=default_base, help="base YAML config every configuration overrides"
                        + (f" (default: configs/{Path(default_base).name} beside the recipe)" if default_base
                           else " (default: the built-in defaults, the values of "
                                "recipes/configs/embedded_sentiment.yaml)"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test budget: 4 steps, small data, seed 0 and shots 1,4 unless given")
    parser.add_argument("--timeout", type=float, help="seconds per run before it is killed and recorded as failed")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run, e.g. model.name=...")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the comparison the parsed arguments describe; exit code 1 when any run failed."""
    defined = dict(args.define)
    names = args.configs if args.configs is None else [*args.configs, *[n for n in defined if n not in args.configs]]
    configs = plan_configs(args.task, names, defined)
    shots = args.shots or ((1, 4) if args.quick and args.task == "fewshot" else DEFAULT_SHOTS[args.task])
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    results = compare(args.task, args.out, configs=configs, shots=shots, seeds=seeds, base=args.base,
                      extra=args.overrides, quick=args.quick, attribute=args.attribute, timeout=args.timeout)
    print((Path(args.out) / "results.md").read_text())
    print("written: " + ", ".join(results["written"]))
    return 1 if any(r["status"] != "ok" for r in results["runs"]) else 0
