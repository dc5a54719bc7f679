"""mmpeft's training step beside the plain loop (`plain_loop.py`, ANCHORS §1), alternating A B A B.

    python benchmarks/speed.py --shapes b32 --modes lora --kinds step e2e --precision fp32 --pairs 3
    python benchmarks/speed.py --shapes tiny --modes lora --kinds step --steps 2 --warmup 1 --pairs 1   # smoke
    mmpeft bench ...                                           # the same, from a source checkout

Every run is a fresh process; a row runs mmpeft (A) and the plain loop (B) `--pairs` times in turn, so load from
other jobs falls on both sides alike, and reports medians over the runs and the ratio over the pairs.
- `step`: identical tensors already in memory (random ids of the model's full text length, random pixels):
  mmpeft's real step (`build_classifier`, `build_optimizer`, Accelerate, the loop's loss and clipping);
- `epochs`: as e2e, but mmpeft trains `--epochs` epochs (default 2) and only its last epoch's steps count, against
  the plain loop's one epoch (it has no cache: every epoch costs the same): what the frozen-tower feature cache
  buys (modes `lora_text`: vision frozen and cached; `probe`: both towers cached; `lora_last2`: LoRA on the last 2
  layers of each tower, the states entering them cached);
- `e2e`: a JSONL of real JPEG files (224-320 px, 4-14 words) on disk, data loading included: `mmpeft train`
  itself (its metrics.json, per-step times from its metrics or tracker) against the plain loop fed like the
  brief's example (images decoded in the main process, text padded to full length); one epoch each, so the
  whole-process wall times (start-up and the image check included) compare too.
Both sides skip the same `--warmup` steps. One JSON per row in `benchmarks/results/speed/`, and the table in
`benchmarks/README.md` is regenerated from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import plain_loop  # noqa: E402  (benchmarks/ is no package)
import speed_report  # noqa: E402
from memory import peak_gib, reset_peak  # noqa: E402

KINDS = ("step", "e2e", "epochs")
PRECISIONS = ("fp32", "bf16", "default")  # default: mmpeft's `auto` against the plain loop in fp32
MODE_OVERRIDES = {
    "full": ["model.text.mode=full", "model.vision.mode=full", "model.dtype=float32"],
    "lora": [],
    "qlora4": ["model.quantization={bits: 4, quant_type: nf4, double_quant: true}"],
    "lora8": ["model.quantization={bits: 8}"],
    "probe": ["model.text.mode=frozen", "model.vision.mode=frozen"],
    "lora_text": ["model.vision.mode=frozen"],
    "lora_last2": ["model.text.lora.layers=2", "model.vision.lora.layers=2"],
}
MMPEFT_PRECISION = {"fp32": "no", "bf16": "bf16", "default": "auto"}
# The plain loop's head and LoRA: a linear head without dropout, LoRA without dropout.
SAME_AS_PLAIN = ["head.hidden=0", "head.dropout=0.0", "model.text.lora.dropout=0.0", "model.vision.lora.dropout=0.0"]
WORDS = ("a the red blue green small big happy sad dog cat tree house car sky sun rain day night photo of with on "
         "near under bright dark old new lovely terrible what wonderful gloomy street park beach city").split()


def mmpeft_overrides(checkpoint: Path, mode: str, precision: str, extra: list[str]) -> list[str]:
    return [f"model.name={checkpoint}", *SAME_AS_PLAIN, *MODE_OVERRIDES[mode],
            f"train.mixed_precision={MMPEFT_PRECISION[precision]}", *extra]


def default_cache() -> str:
    from mmpeft.backbones.embedded import cache_dir  # $MMPEFT_CACHE, else ~/.cache/mmpeft

    return str(cache_dir())


def plain_precision(precision: str) -> str:
    return "bf16" if precision == "bf16" else "fp32"


# --- step only: mmpeft's side, in a child process -------------------------------------------------------------------


def build_mmpeft_step(args, tokens: int | None = None):
    """mmpeft's real step and the identical tensors the plain loop gets: the parts and calls `mmpeft train` makes.

    Returns (step, batch, accelerator, model)."""
    import torch
    from accelerate import Accelerator

    from mmpeft import build_classifier, load_backbone, load_config
    from mmpeft.models.precision import fit_backbone_to_precision, keep_trainable_fp32
    from mmpeft.training.optim import build_optimizer, resolve_mixed_precision

    checkpoint = plain_loop.checkpoint_for(args.shape, Path(args.cache), getattr(args, "image_size", None))
    cfg = load_config(None, mmpeft_overrides(checkpoint, args.mode, args.precision, args.mmpeft))
    backbone = load_backbone(cfg.model.name, dtype=cfg.model.dtype, quantization=cfg.model.quantization,
                             device=args.device)
    mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision, backbone.model)
    fit_backbone_to_precision(backbone, cfg.model, mixed_precision, torch.device(args.device))  # as `mmpeft train`
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=args.device == "cpu")
    model = build_classifier(backbone, cfg, ["negative", "neutral", "positive"])
    keep_trainable_fp32(model)
    optimizer = build_optimizer(model, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = MmpeftStep(model, optimizer, accelerator, cfg.train)
    model.train()
    batch = plain_loop.synthetic_batch(backbone.model.config, args.batch, accelerator.device, args.seed, tokens)
    return step, batch, accelerator, model


class MmpeftStep:
    """The loop's step (`mmpeft/training/step.py: device_checked_step`) in its three parts (the profiler times
    each): loss, backward, clipped optimizer update with the non-finite check on the device."""

    def __init__(self, model, optimizer, accelerator, train_cfg):
        import torch

        from mmpeft.training.faults import NonFiniteSkip

        self.model, self.optimizer, self.accelerator, self.cfg = model, optimizer, accelerator, train_cfg
        self.cross_entropy = torch.nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)
        skip = NonFiniteSkip(optimizer, accelerator.device)
        self.nonfinite = skip if skip.on_device else None
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.steps = 0

    def loss(self, batch: dict):
        self._loss = self.cross_entropy(self.model(**batch).float(), batch["labels"])  # the check reads it
        return self._loss

    def backward(self, loss) -> None:
        self.accelerator.backward(loss)

    def update(self) -> None:
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.steps += 1
        if self.nonfinite is not None:
            self.nonfinite.check(self._loss, self.trainable, self.steps, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, batch: dict):
        loss = self.loss(batch)
        self.backward(loss)
        self.update()
        return loss


def mmpeft_step_child(args) -> dict:
    """Step only, mmpeft's side: `--steps` steps on the identical tensors, timed one by one."""
    step, batch, accelerator, model = build_mmpeft_step(args, getattr(args, "tokens", None))
    reset_peak()
    times = plain_loop.timed_steps(step, (batch for _ in range(args.steps)), args.steps, accelerator.device)
    return {"side": "mmpeft", "step_seconds": times, "batch": args.batch, "peak_memory_gib": peak_gib(),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "mixed_precision": accelerator.mixed_precision, "text_tokens": batch["input_ids"].shape[1]}


# --- end to end ------------------------------------------------------------------------------------------------------


def write_manifest(folder: Path, examples: int, seed: int = 0) -> Path:
    """`examples` JPEG files of 224-320 px with 4-14-word texts and 3 labels, written once."""
    manifest = folder / "train.jsonl"
    if manifest.exists():
        return manifest
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(examples):
        h, w = (int(v) for v in rng.integers(224, 321, 2))
        base = np.linspace(0, 255, w)[None, :, None] * rng.random(3) + np.linspace(0, 255, h)[:, None, None] * rng.random(3)
        pixels = np.clip(base / 2 + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i:05d}.jpg", quality=90)
        text = " ".join(rng.choice(WORDS, int(rng.integers(4, 15))))
        rows.append({"image": f"images/{i:05d}.jpg", "text": text, "label": ["negative", "neutral", "positive"][i % 3]})
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(manifest)
    return manifest


def step_seconds_from_run(out: Path, metrics: dict, batch: int) -> tuple[list[float], str]:
    """Per-step seconds of a `mmpeft train` run: from metrics.json once the loop records them, else from the
    cumulative samples/s it logs at every step (log_every=1, tensorboard), else the whole run's mean."""
    if metrics.get("step_seconds"):
        return list(metrics["step_seconds"]), "metrics.json step_seconds"
    events = sorted(out.glob("logs/**/events.out.tfevents.*"))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(events[-1].parent), size_guidance={"scalars": 0})
        acc.Reload()
        cumulative = [(e.step, e.step * batch / e.value) for e in acc.Scalars("train/samples_per_s")]
        if cumulative:
            seconds = [t for _, t in sorted(cumulative)]
            return [b - a for a, b in zip([0.0, *seconds], seconds)], "tracker train/samples_per_s (log_every=1)"
    steps = metrics["steps"]
    return [metrics["train_seconds"] / steps] * steps, "mean over all steps (warm-up NOT skipped)"


def mmpeft_e2e(args, checkpoint: Path, manifest: Path, work: Path, run: int, epochs: int = 1) -> dict:
    """`mmpeft train` itself, one epoch (or `--steps`), in a fresh process; its metrics.json read back. With
    `epochs` > 1 only the last epoch's steps are kept (the feature cache fills in the first)."""
    out = work / f"mmpeft-{run}"
    # Loader workers as `mmpeft train` picks them (none on 2 cores); per-step seconds from its metrics.json.
    cmd = [sys.executable, "-m", "mmpeft.cli", "train", *mmpeft_overrides(checkpoint, args.mode, args.precision, []),
           f"data.train={manifest}", f"data.batch_size={args.batch}", f"train.epochs={epochs}",
           f"train.max_steps={args.steps * epochs}",
           f"train.output_dir={out}", "train.progress=false", "train.tracker=null", f"train.seed={args.seed}",
           *args.mmpeft]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=not args.verbose, env=_child_env(args))
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    times, source = step_seconds_from_run(out, metrics, args.batch)
    if epochs > 1:
        times, source = times[-args.steps:], f"{source}, epoch {epochs} of {epochs}"
    return {"side": "mmpeft", "step_seconds": times, "timing_source": source, "batch": args.batch,
            "feature_cache": metrics.get("feature_cache"),
            "wall_seconds": wall, "peak_memory_gib": metrics["peak_memory_gib"],
            "trainable_parameters": sum(p["trainable"] for p in metrics["trainable_parameters"].values()),
            "mixed_precision": metrics["mixed_precision"], "command": cmd[1:]}


def _child_env(args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_child(args, side: str, manifest: Path | None = None) -> dict:
    """One run in a fresh process; its RESULT line, with the wall time of the whole process."""
    common = ["--shape", args.shape, "--mode", args.mode, "--batch", str(args.batch), "--steps", str(args.steps),
              "--device", args.device, "--cache", str(args.cache), "--seed", str(args.seed)]
    if side == "plain":
        cmd = [sys.executable, str(HERE / "plain_loop.py"), *common, "--precision", plain_precision(args.precision),
               *(["--manifest", str(manifest)] if manifest else [])]
    else:
        cmd = [sys.executable, __file__, "--child", *common, "--precision", args.precision,
               *(f"--mmpeft={o}" for o in args.mmpeft)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(args))
    wall = time.perf_counter() - started
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not found:
        raise RuntimeError(f"{side} run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    result = json.loads(found[-1][7:])
    if manifest is not None:
        result["wall_seconds"] = wall
    result.setdefault("mixed_precision", "bf16" if plain_precision(args.precision) == "bf16" else "no")
    return result


def run_row(args, kind: str) -> dict:
    """`--pairs` times mmpeft then the plain loop, each in a fresh process; the row's result."""
    checkpoint = plain_loop.checkpoint_for(args.shape, Path(args.cache))
    manifest = None
    if kind in ("e2e", "epochs"):
        examples = -(-args.e2e_examples // args.batch) * args.batch  # whole batches: per-step samples are exact
        manifest = write_manifest(Path(args.cache) / "bench" / f"e2e-jpeg-{examples}", examples)
        args.steps = min(args.steps or examples // args.batch, examples // args.batch)
    pairs, loads = [], []
    with tempfile.TemporaryDirectory(prefix="mmpeft-speed-") as work:
        for i in range(args.pairs):
            loads.append(os.getloadavg()[0])
            if kind == "step":
                a = run_child(args, "mmpeft")
            else:
                a = mmpeft_e2e(args, checkpoint, manifest, Path(work), i, args.epochs if kind == "epochs" else 1)
            loads.append(os.getloadavg()[0])
            b = run_child(args, "plain", manifest)
            loads.append(os.getloadavg()[0])
            pairs.append((a, b))
            print(f"  pair {i + 1}: mmpeft {len(a['step_seconds'])} steps, plain {len(b['step_seconds'])} steps, "
                  f"load {loads[-1]:.1f}", flush=True)
    config = {"kind": kind, "shape": args.shape, "model": plain_loop.SHAPES[args.shape], "mode": args.mode,
              "precision": args.precision, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
              "pairs": args.pairs, "device": args.device, "tag": args.tag, "mmpeft_overrides": args.mmpeft,
              "text_tokens_plain": pairs[0][1]["text_tokens"], "e2e_manifest": str(manifest) if manifest else None}
    return {"schema": speed_report.SCHEMA, "config": config, "run": speed_report.run_info(ROOT, sys.argv[1:]),
            "load_avg": loads, "precision_used": {"mmpeft": pairs[0][0]["mixed_precision"],
                                                  "plain": pairs[0][1]["mixed_precision"]},
            "sides": {"mmpeft": speed_report.summarize_side([a for a, _ in pairs], args.warmup),
                      "plain": speed_report.summarize_side([b for _, b in pairs], args.warmup)},
            "ratios": speed_report.ratios(pairs, args.warmup), "runs": [{"mmpeft": a, "plain": b} for a, b in pairs]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny"], choices=sorted(plain_loop.SHAPES))
    parser.add_argument("--modes", nargs="+", default=["lora"], choices=plain_loop.MODES)
    parser.add_argument("--kinds", nargs="+", default=["step"], choices=KINDS)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, help="steps per run, warm-up included (step: default 10; e2e: one "
                        "epoch)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the statistics")
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs (mmpeft, plain) per row")
    parser.add_argument("--e2e-examples", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=2, help="kind epochs: mmpeft's epochs (the last one counts)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mmpeft", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for the mmpeft side (a lever), e.g. --mmpeft model.dtype=bfloat16")
    parser.add_argument("--tag", default="", help="suffix of the row's name (e.g. the lever it measures)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "speed")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    parser.add_argument("--cache", default=default_cache())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="show the output of `mmpeft train` runs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)  # scaling.py: text length of the batch
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)  # scaling.py: image resolution
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        args.steps = args.steps or 10
        print("RESULT " + json.dumps(mmpeft_step_child(args)), flush=True)
        return 0
    written = []
    for shape in args.shapes:
        for mode in args.modes:
            for kind in args.kinds:
                row = argparse.Namespace(**{**vars(args), "shape": shape, "mode": mode})
                row.steps = args.steps if args.steps or kind in ("e2e", "epochs") else 10
                print(f"{kind} {shape} {mode} {args.precision} batch {args.batch} on {args.device}", flush=True)
                result = run_row(row, kind)
                written.append(speed_report.write_row(args.out, result))
                r = result["ratios"]["samples_per_s"]
                print(f"  mmpeft / plain samples/s: median {r['median']:.2f} (min {r['min']:.2f}, max {r['max']:.2f})"
                      f" -> {written[-1]}", flush=True)
    speed_report.update_readme(args.readme, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
