"""The CPU levers of issue 13 that live outside the loop, each measured A B A B in one process:

    python benchmarks/cpu_levers.py                   # tiny + ViT-B/32 shapes; ~6 min on 2 cores
    python benchmarks/cpu_levers.py --shapes tiny --repeats 1 --steps 2    # smoke

- `fused_adamw`: `optimizer.step()` seconds of torch's fused AdamW against its default (foreach) kernel over the
  trainable parameters of mmpeft's LoRA and full models (random gradients), and the largest difference of the
  parameters after 3 steps;
- `autocast`: seconds per mmpeft step (identical tensors) with bf16 autocast against fp32: what `auto` decides on;
- `bf16_base`: LoRA under bf16 autocast with the base weights stored in bf16 (LoRA and head in fp32) against fp32.
Writes results/cpu_levers.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import speed  # noqa: E402  (benchmarks/ is no package)
import speed_report  # noqa: E402

BATCH = {"tiny": 32, "b32": 8}  # the batches of the figures


def _args(shape: str, mode: str, precision: str, batch: int, extra: list[str]):
    return argparse.Namespace(shape=shape, mode=mode, precision=precision, batch=batch, cache=speed.default_cache(),
                              device="cpu", seed=0, mmpeft=extra, steps=None)


def step_seconds(args, steps: int) -> float:
    """Median seconds of `steps` mmpeft steps after one warm-up (identical tensors), in a fresh process: each
    precision needs its own Accelerate state."""
    args.steps = steps + 1
    return statistics.median(speed.run_child(args, "mmpeft")["step_seconds"][1:])


def alternate(a, b, repeats: int) -> dict:
    """A B A B ...: each a callable returning seconds; the ratio b / a per pair (> 1: A is faster)."""
    pairs = [(a(), b()) for _ in range(repeats)]
    return {"a_seconds": [x for x, _ in pairs], "b_seconds": [y for _, y in pairs],
            "b_over_a": speed_report.spread([y / x for x, y in pairs]), "load_avg": os.getloadavg()[0]}


def fused_adamw(shape: str, mode: str, repeats: int) -> dict:
    import torch

    from mmpeft import build_classifier, load_backbone, load_config

    checkpoint = speed.plain_loop.checkpoint_for(shape, Path(speed.default_cache()))
    cfg = load_config(None, speed.mmpeft_overrides(checkpoint, mode, "fp32", []))
    model = build_classifier(load_backbone(cfg.model.name, dtype=cfg.model.dtype), cfg, ["a", "b", "c"])
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    start = [p.detach().clone() for p in params]
    finals = {}

    def timed(fused: bool):
        def run() -> float:
            for p, s, g in zip(params, start, grads):
                p.data.copy_(s)
                p.grad = g.clone()
            opt = torch.optim.AdamW(params, lr=1e-3, fused=fused or None)
            opt.step()  # state created
            started = time.perf_counter()
            opt.step()
            opt.step()
            seconds = (time.perf_counter() - started) / 2
            finals[fused] = [p.detach().clone() for p in params]
            return seconds
        return run

    result = alternate(timed(True), timed(False), repeats)
    result["max_abs_difference"] = max(float((a - b).abs().max()) for a, b in zip(finals[True], finals[False]))
    result["trainable_parameters"] = sum(p.numel() for p in params)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "b32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cpu_levers.json")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = parser.parse_args(argv)
    rows = []
    for shape in args.shapes:
        batch = BATCH.get(shape, 8)
        for mode in ("lora", "full"):
            rows.append({"lever": "fused_adamw", "shape": shape, "mode": mode, "a": "fused", "b": "foreach",
                         **fused_adamw(shape, mode, args.repeats)})
        fp32 = _args(shape, "lora", "fp32", batch, [])
        rows.append({"lever": "autocast", "shape": shape, "mode": "lora", "batch": batch, "a": "bf16 autocast",
                     "b": "fp32", **alternate(lambda: step_seconds(_args(shape, "lora", "bf16", batch, []), args.steps),
                                              lambda: step_seconds(fp32, args.steps), args.repeats)})
        rows.append({"lever": "bf16_base", "shape": shape, "mode": "lora", "batch": batch,
                     "a": "bf16 base + fp32 LoRA, bf16 autocast", "b": "fp32 base, bf16 autocast", **alternate(
                         lambda: step_seconds(_args(shape, "lora", "bf16", batch, ["model.dtype=bfloat16"]), args.steps),
                         lambda: step_seconds(_args(shape, "lora", "bf16", batch, []), args.steps), args.repeats)})
        print(json.dumps(rows[-3:], indent=1)[:2000], flush=True)
    result = {"run": speed_report.run_info(HERE.parent, sys.argv[1:]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| lever | shapes | mode | A | B | B / A (median of pairs, min–max) | seconds A / B (median) "
             "| max abs difference after 3 steps | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r["b_over_a"]
        lines.append(f"| {r['lever']} | {r['shape']} | {r['mode']}{' b' + str(r['batch']) if 'batch' in r else ''} "
                     f"| {r['a']} | {r['b']} | **{x['median']:.2f}** ({x['min']:.2f}–{x['max']:.2f}) | "
                     f"{statistics.median(r['a_seconds']):.4f} / {statistics.median(r['b_seconds']):.4f} "
                     f"| {r.get('max_abs_difference', '')} | {r['load_avg']:.1f} |")
    speed_report.replace_block(args.readme, "cpu-levers", f"`python benchmarks/cpu_levers.py {' '.join(sys.argv[1:])}`"
                               f", {result['run']['date']}, commit {result['run']['git_commit'][:7]}:\n\n"
                               + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
