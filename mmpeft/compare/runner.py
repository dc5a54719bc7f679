"""Fine-tuning configurations side by side on one task, seed and budget, each run in a fresh process.

    python recipes/compare.py --task sentiment --quick
    mmpeft compare --task sentiment --train-sizes 8,16,32,64,161,all --seeds 0,1,2 --out out/curves-sentiment
    mmpeft compare --task fewshot --shots 1,2,4,8,16 --seeds 0,1,2 --out out/compare-fewshot

Training sizes (`--train-sizes`, alias `--shots`) are examples per class: a class-balanced subset of the training
manifest drawn by seed (`subsample_manifest`), the same subset for every configuration of that seed; `all` is the
whole (unbalanced) split. Runs record it as `shots` (None for `all`). The step budget of a learning curve is one
rule for every configuration and size (`CURVE_BUDGET`): exactly `train.max_steps=200` optimizer steps, the
validation split scored every 20 and its best step kept; a size of one batch or less repeats it, a larger one sees
more distinct examples in the same steps. Without sizes, sentiment runs take the base config's own budget.
Paired differences between configurations (bootstrap intervals over test rows and seeds): `compare.stats`.

Every (configuration, size, seed) is one `mmpeft train` in its own subprocess, so the peak memory it reports
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
        # LoRA on the MLPs too (CLIP's module names), at a third of the attention-only rate: the one LoRA that
        # beat attention-only LoRA on this task (3 seeds, benchmarks/README.md)
        "lora_vision_mlp": ["model.text.mode=frozen", "model.vision.mode=lora", "train.lr_lora=1e-3",
                            r"model.vision.lora.targets=vision_model\.encoder\.layers\.{layer}\."
                            r"(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"],
    },
}
# The step budget of every run of a learning curve (any --train-sizes): one rule for every configuration and size.
CURVE_BUDGET = ["train.max_steps=200", "train.eval_every=20"]
# Applied before each configuration's overrides; the same for every configuration of a task.
TASK_OVERRIDES = {
    "sentiment": ["train.tracker=null"],
    # One step budget for every k (`max_steps`: exactly that many steps, however many epochs that takes; an epoch
    # is a single batch at k=1); the validation split picks the best step.
    "fewshot": ["head.type=prompt", "head.mode=full", "train.tracker=null", *CURVE_BUDGET, "data.batch_size=32",
                "data.num_workers=0"],
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
        raise ConfigError(f"--train-sizes with --task sentiment needs a JSONL training manifest, got {src}.")
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(str(row[label_column]), []).append(row)
    short = {label: len(r) for label, r in by_label.items() if len(r) < shots}
    if short:
        raise ConfigError(f"{src}: --train-sizes {shots} needs {shots} examples of every label; these have fewer: "
                          f"{short} (the largest class-balanced size is {min(len(r) for r in by_label.values())}; "
                          "`all` is the whole split).")
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


def run_overrides(task: str, shots_list: list, *, quick: bool) -> list[str]:
    """What every run of a comparison starts from: the task's overrides, the learning-curve budget, --quick's."""
    own = any(o.startswith("train.max_steps=") for o in TASK_OVERRIDES[task])  # fewshot, position: a fixed budget
    curve = CURVE_BUDGET if shots_list != [None] and not own else []
    return [*TASK_OVERRIDES[task], *curve, *(QUICK_OVERRIDES if quick else [])]


def compare(task: str, out: str | Path, *, configs: dict[str, list[str]] | None = None,
            shots: list[int | None] | None = None, seeds: list[int] = (0,), base: str | None = None,
            extra: list[str] = (), quick: bool = False, attribute: str = "shape", timeout: float | None = None,
            log=print, wise_alphas: list[float] | None = None) -> dict:
    """Run every configuration over training sizes (`shots`: per class, None for the whole split) and seeds; write
    results.json, results.md and the charts into `out`, with paired differences of every two configurations."""
    import torch

    from .child import run_one
    from .report import write_report
    from .stats import paired_differences

    out = Path(out)
    configs = plan_configs(task) if configs is None else configs
    shots_list: list[int | None] = list(shots) if shots else [None]
    if task == "fewshot" and None in shots_list:
        raise ConfigError("--task fewshot needs k-shot sizes (e.g. --train-sizes 1,2,4,8,16); `all` is sentiment's.")
    extra, seeds = list(extra), list(seeds)
    cuda = torch.cuda.is_available()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(task, out, base, extra, shots_list, seeds, quick=quick, attribute=attribute)
    # Frozen towers' features on disk, shared by every run of the comparison (same weights and inputs, same key).
    common = [*run_overrides(task, shots_list, quick=quick), "train.feature_cache=disk",
              f"train.feature_cache_dir={(out / 'feature-cache').resolve()}"]
    results = {"meta": {**_meta(task, base, extra, quick, cuda), "configs": configs, "shots": shots_list,
                        "seeds": seeds, "attribute": attribute if task == "fewshot" else None,
                        "step_budget": _budget(common, base, extra)}, "runs": []}
    total = len(configs) * len(shots_list) * len(seeds)
    for k in shots_list:
        for name, config_overrides in configs.items():
            for seed in seeds:
                run_dir = out / "runs" / name / f"{'all' if k is None else f'k{k}'}-seed{seed}"
                record = run_one(name, [*common, *config_overrides, *data[k, seed], *extra], run_dir, base=base,
                                 seed=seed, shots=k, cuda=cuda, timeout=timeout, comparison=out)
                results["runs"].append(record)
                (out / "results.json").write_text(json.dumps(results, indent=2))  # partial results survive
                _log_run(log, record, len(results["runs"]), total)
    if wise_alphas and task == "fewshot":  # WiSE-FT sweep of the trained prompt-head runs (compare/wise.py)
        from .wise import comparison_sweep

        results["wise"] = comparison_sweep(results, out, wise_alphas, attribute, quick, log)
    results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["paired"] = paired_differences(results["runs"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    results["written"] = [str(p) for p in write_report(results, out)]
    return results


def _budget(common: list[str], base: str | None, extra: list[str]) -> str:
    """The step budget every run got, in words (recorded in results.json and the table's header)."""
    from ..config import load_config

    train = load_config(base, [*common, *extra]).train
    if train.max_steps:
        return f"{train.max_steps} optimizer steps for every configuration and size (validation every " \
               f"{train.eval_every or 'epoch'}, best step kept)"
    return f"{train.epochs} epochs of the training split (the base config's budget), best validation step kept"


def _log_run(log, record: dict, done: int, total: int) -> None:
    k = record["shots"]
    what = f"[{done}/{total}] {record['config']}{'' if k is None else f' k={k}'} seed {record['seed']}"
    if record["status"] == "ok":
        log(f"{what}: test macro-F1 {record['test_macro_f1']:.4f}, {record['train_seconds']:.1f} s, "
            f"peak {record['peak_memory_gib']:.2f} GiB")
    else:
        log(f"{what}: FAILED: {(record['error'] or '').splitlines()[-1] if record['error'] else ''}")


# --- command line (recipes/compare.py and `mmpeft compare`) --------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _sizes(text: str) -> list[int | None]:
    """'8,16,all' -> [8, 16, None]: examples per class, `all` for the whole split."""
    try:
        sizes = [None if x.strip().lower() == "all" else int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or 'all', got {text!r}") from None
    if any(k is not None and k < 1 for k in sizes):
        raise argparse.ArgumentTypeError(f"training sizes are examples per class (1 or more), got {text!r}")
    return sizes


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
    parser.add_argument("--train-sizes", "--shots", dest="shots", type=_sizes, metavar="SIZES",
                        help="training examples per class, e.g. 8,16,32,64,161,all: class-balanced subsets drawn "
                             "by seed, the same for every configuration; `all` is the whole split (sentiment). "
                             "Every run then gets one step budget (200 steps). fewshot: k-shot sets, default "
                             "1,2,4,8,16")
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
    parser.add_argument("--wise-alphas", help="fewshot: after training, interpolate each trained run towards its "
                        "zero-shot start at these alphas (e.g. 0,0.25,0.5,0.75,1) and score test + shifted splits")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run, e.g. model.name=...")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the comparison the parsed arguments describe; exit code 1 when any run failed."""
    from .wise import parse_alphas

    defined = dict(args.define)
    names = args.configs if args.configs is None else [*args.configs, *[n for n in defined if n not in args.configs]]
    configs = plan_configs(args.task, names, defined)
    shots = args.shots or ((1, 4) if args.quick and args.task == "fewshot" else DEFAULT_SHOTS[args.task])
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    results = compare(args.task, args.out, configs=configs, shots=shots, seeds=seeds, base=args.base,
                      extra=args.overrides, quick=args.quick, attribute=args.attribute, timeout=args.timeout,
                      wise_alphas=parse_alphas(args.wise_alphas) if args.wise_alphas else None)
    print((Path(args.out) / "results.md").read_text())
    print("written: " + ", ".join(results["written"]))
    return 1 if any(r["status"] != "ok" for r in results["runs"]) else 0
