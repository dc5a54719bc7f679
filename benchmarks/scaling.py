"""Step time and peak memory of mmpeft's LoRA step against batch size, image resolution, text length and LoRA
rank, and epoch time with the frozen-vision feature cache against data set size; charts in benchmarks/README.md.

    python benchmarks/scaling.py --shape tiny                 # ~3 min on 2 cores
    python benchmarks/scaling.py --shape b32 --steps 3        # ViT-B/32 shapes, CPU: ~15 min on 2 cores

Each point of the first four charts is speed.py's step-only mmpeft child in a fresh process (so its peak is its
own), fp32, `--steps` steps of which the first is left out; the feature-cache chart runs in this process:
uncached epoch, first cached epoch (filling) and a later one (cached, images no longer decoded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import speed  # noqa: E402  (benchmarks/ is no package)
import speed_report  # noqa: E402

AXES = {  # axis -> (values, speed.py child arguments for one value)
    "batch": ([2, 4, 8, 16], lambda v: ["--batch", str(v)]),
    "image_size": ([None, 2], lambda v: ["--image-size", str(v)] if v else []),  # None: native; 2: x2 resolution
    "text_tokens": ([8, 16, 32, 77], lambda v: ["--tokens", str(v)]),
    "lora_rank": ([4, 16, 64], lambda v: [f"--mmpeft=model.text.lora.r={v}", f"--mmpeft=model.vision.lora.r={v}"]),
}
NATIVE_IMAGE = {"tiny": 64}


def point(shape: str, args: list[str], steps: int, cache: str) -> dict:
    cmd = [sys.executable, str(HERE / "speed.py"), "--child", "--shape", shape, "--mode", "lora", "--precision",
           "fp32", "--steps", str(steps), "--cache", cache, "--device", "cpu", "--batch", "8", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not found:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(found[-1][7:])
    return {"seconds_per_step": statistics.median(result["step_seconds"][1:]),
            "peak_memory_gib": result["peak_memory_gib"], "load_avg": os.getloadavg()[0]}


def text_positions(shape: str, cache: str) -> int:
    """How many tokens the shape's text tower reads (its position embeddings)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(speed.plain_loop.checkpoint_for(shape, Path(cache)))
    return config.text_config.max_position_embeddings


def cache_epochs(shape: str, sizes: list[int], cache: Path) -> list[dict]:
    """`shape`'s checkpoint, vision frozen (LoRA on text): epoch seconds uncached, filling the cache, and cached."""
    import tempfile

    import torch

    from mmpeft import build_classifier, build_dataloaders, load_backbone, load_config
    from mmpeft.models.feature_cache import FeatureCache, cache_key

    rows = []
    for size in sizes:
        manifest = speed.write_manifest(cache / "bench" / f"e2e-jpeg-{size}", size)
        checkpoint = speed.plain_loop.checkpoint_for(shape, cache)
        cfg = load_config(None, [f"model.name={checkpoint}", f"data.train={manifest}", "data.batch_size=8",
                                 "data.num_workers=0", "model.vision.mode=frozen", "train.mixed_precision=no"])
        backbone = load_backbone(cfg.model.name)
        loader = build_dataloaders(cfg.data, backbone, splits=("train",)).loaders["train"]
        model = build_classifier(backbone, cfg, ["negative", "neutral", "positive"]).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)

        def epoch() -> float:
            started = time.perf_counter()
            for batch in loader:
                torch.nn.functional.cross_entropy(model(**batch), batch["labels"]).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - started

        uncached = epoch()
        with tempfile.TemporaryDirectory() as root:
            key = cache_key(model, "vision", loader.dataset, mixed_precision="no", device="cpu",
                            image_processor=backbone.image_processor)
            model.feature_caches = {"vision": FeatureCache(key, len(loader.dataset), root=root)}
            filling = epoch()
            loader.dataset.load_images = False
            cached = epoch()
        rows.append({"examples": size, "uncached_s": uncached, "first_cached_epoch_s": filling, "cached_s": cached,
                     "speedup": uncached / cached, "load_avg": os.getloadavg()[0]})
        print(f"  cache, {size} examples: uncached {uncached:.2f} s, filling {filling:.2f} s, cached {cached:.2f} s",
              flush=True)
    return rows


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 5, figsize=(20, 7))
    for i, (axis, points) in enumerate(result["axes"].items()):
        xs = [p["value"] for p in points]
        axes[0, i].plot(xs, [p["seconds_per_step"] for p in points], "o-")
        axes[1, i].plot(xs, [p["peak_memory_gib"] for p in points], "o-", color="tab:red")
        axes[0, i].set_title(axis)
        axes[1, i].set_xlabel(axis)
    axes[0, 0].set_ylabel("s / step")
    axes[1, 0].set_ylabel("peak GiB (resident set)")
    cache = result["feature_cache"]
    sizes = [r["examples"] for r in cache]
    for key, label in (("uncached_s", "uncached"), ("first_cached_epoch_s", "filling"), ("cached_s", "cached")):
        axes[0, 4].plot(sizes, [r[key] for r in cache], "o-", label=label)
    axes[0, 4].set_title(f"feature cache ({result['shape']}, vision frozen)")
    axes[0, 4].set_ylabel("s / epoch")
    axes[0, 4].legend()
    axes[1, 4].plot(sizes, [r["speedup"] for r in cache], "o-")
    axes[1, 4].set_xlabel("examples")
    axes[1, 4].set_ylabel("uncached / cached epoch")
    fig.suptitle(f"mmpeft LoRA step, {result['shape']} shapes, fp32, CPU (load avg "
                 f"{min(result['load_avg']):.1f}-{max(result['load_avg']):.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(speed.plain_loop.SHAPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cache-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--cache", default=speed.default_cache())
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scaling")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = parser.parse_args(argv)
    native = NATIVE_IMAGE.get(args.shape, 224)
    result = {"shape": args.shape, "steps": args.steps, "axes": {}, "load_avg": [os.getloadavg()[0]],
              "run": speed_report.run_info(HERE.parent, sys.argv[1:])}
    positions = text_positions(args.shape, args.cache)
    for axis, (values, to_args) in AXES.items():
        points = []
        for value in values:
            if axis == "text_tokens" and value > positions:  # the tiny CLIP reads at most 32 tokens
                print(f"  {axis}={value}: skipped, the text tower has {positions} positions", flush=True)
                continue
            shown = native * value if axis == "image_size" and value else (native if axis == "image_size" else value)
            child = to_args(native * value) if axis == "image_size" and value else to_args(value)
            points.append({"value": shown, **point(args.shape, child, args.steps, args.cache)})
            print(f"  {axis}={shown}: {points[-1]['seconds_per_step']:.3f} s/step, "
                  f"{points[-1]['peak_memory_gib']:.2f} GiB", flush=True)
        result["axes"][axis] = points
    result["feature_cache"] = cache_epochs(args.shape, args.cache_sizes, Path(args.cache))
    result["load_avg"] += [p["load_avg"] for pts in result["axes"].values() for p in pts]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cpu-{args.shape}.json").write_text(json.dumps(result, indent=2) + "\n")
    chart(result, args.out / f"cpu-{args.shape}.png")
    images = sorted(p.name for p in args.out.glob("cpu-*.png"))
    speed_report.replace_block(args.readme, "scaling", "\n\n".join(
        f"![{name}](results/scaling/{name})" for name in images))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
