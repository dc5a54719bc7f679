"""Where the time of mmpeft's training step goes: torch.profiler over the step of LoRA B/16 (CPU here, CUDA too).

    python benchmarks/profile_step.py --shape b16 --batch 8 --steps 3          # ~2 min on 2 cores
    python benchmarks/profile_step.py --shape tiny --steps 2                    # smoke

mmpeft's real step (speed.py's `build_mmpeft_step`) fed by mmpeft's own DataLoader over a JSONL of JPEG files,
so data wait shows too. Ranges: `data wait` (next batch), `forward` (model + loss), `backward`
(`accelerator.backward`), `optimizer` (clipping, step, zero_grad); inside the forward, every attention block,
MLP and LoRA branch (lora_A -> lora_B) gets its own range. Backward time cannot be split by module that way:
`record_function` ranges cover the forward only (autograd runs the backward outside them), so the backward is
reported as one range plus its top operators (autograd's `evaluate_function: <Op>Backward` events).
Writes results/profile/<device>-<shape>-<mode>.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import speed  # noqa: E402  (benchmarks/ is no package)
import speed_report  # noqa: E402

RANGES = ("data wait", "forward", "backward", "optimizer")
PARTS = ("attention", "mlp", "lora")


def _wrap(module, name: str) -> None:
    from torch.profiler import record_function

    forward = module.forward

    def ranged(*args, **kwargs):
        with record_function(name):
            return forward(*args, **kwargs)

    module.forward = ranged


def label_modules(model) -> dict[str, int]:
    """Put a profiler range around each attention block, MLP and LoRA branch of the towers; count them."""
    counts = dict.fromkeys(PARTS, 0)
    for name, module in model.named_modules():
        kind = type(module).__name__
        if name.endswith((".lora_A.default", ".lora_B.default")):
            part = "lora"
        elif kind.endswith("Attention") and "encoder.layers" in name:
            part = "attention"
        elif kind.endswith("MLP") and "encoder.layers" in name:
            part = "mlp"
        else:
            continue
        _wrap(module, part)
        counts[part] += 1
    return counts


def profile(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    from mmpeft import build_dataloaders, load_backbone, load_config

    step, _, accelerator, model = speed.build_mmpeft_step(args)
    counts = label_modules(model)
    manifest = speed.write_manifest(Path(args.cache) / "bench" / "e2e-jpeg-600", 600)
    backbone = load_backbone(str(speed.plain_loop.checkpoint_for(args.shape, Path(args.cache))))
    cfg = load_config(None, [f"data.train={manifest}", f"data.batch_size={args.batch}", "data.num_workers=0"])
    loader = iter(build_dataloaders(cfg.data, backbone, splits=("train",)).loaders["train"])
    for _ in range(args.warmup):
        step({k: v.to(accelerator.device) for k, v in next(loader).items()})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(args.steps):
            with record_function("data wait"):
                batch = {k: v.to(accelerator.device) for k, v in next(loader).items()}
            with record_function("forward"):
                loss = step.loss(batch)
            with record_function("backward"):
                step.backward(loss)
            with record_function("optimizer"):
                step.update()
            if args.device == "cuda":
                torch.cuda.synchronize()
    return summarize(prof, args, counts)


def summarize(prof, args, counts: dict) -> dict:
    cuda = args.device == "cuda"
    events = prof.key_averages()
    total = {e.key: (e.device_time_total if cuda else e.cpu_time_total) / 1e6 for e in events}
    step_total = sum(total.get(r, 0.0) for r in RANGES)
    ops = [e for e in events if e.key not in RANGES + PARTS and not e.key.startswith("ProfilerStep")]
    ops.sort(key=lambda e: -(e.self_device_time_total if cuda else e.self_cpu_time_total))
    top = [{"op": e.key, "self_seconds": (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6,
            "calls": e.count} for e in ops[:15]]
    backward_ops = [o for o in top if re.match(r"autograd::engine::evaluate_function", o["op"])]
    return {"schema": "mmpeft-profile/1", "shape": args.shape, "mode": args.mode, "batch": args.batch,
            "precision": args.precision, "device": args.device, "steps": args.steps,
            "seconds_per_step": step_total / args.steps,
            "share": {name: total.get(name, 0.0) / step_total for name in RANGES},
            "forward_share": {part: total.get(part, 0.0) / max(total.get("forward", 0.0), 1e-12) for part in PARTS},
            "ranged_modules": counts, "top_operators": top, "top_backward_operators": backward_ops}


def table(result: dict) -> str:
    share, fwd = result["share"], result["forward_share"]
    lines = [f"{result['shape']} {result['mode']}, batch {result['batch']}, {result['precision']}, "
             f"{result['device']}, {result['seconds_per_step']:.2f} s/step (profiled; {result['steps']} steps):", "",
             "| range | share of step |", "|---|---|"]
    lines += [f"| {name} | {share[name]:.1%} |" for name in RANGES]
    notes = {"attention": " (its LoRA included)", "mlp": "", "lora": " (lora_A + lora_B, inside attention)"}
    lines += [f"| forward: {part}{notes[part]} | {fwd[part]:.1%} of forward |" for part in PARTS]
    lines += ["", "| top operator (self time) | s / step | calls |", "|---|---|---|"]
    lines += [f"| `{o['op']}` | {o['self_seconds'] / result['steps']:.3f} | {o['calls']} |"
              for o in result["top_operators"][:10]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="b16")
    parser.add_argument("--mode", default="lora")
    parser.add_argument("--precision", default="fp32", choices=speed.PRECISIONS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cache", default=speed.default_cache())
    parser.add_argument("--out", type=Path, default=HERE / "results" / "profile")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = parser.parse_args(argv)
    args.mmpeft, args.seed = [], 0
    import os

    result = profile(args)
    result["load_avg"] = os.getloadavg()[0]
    result["run"] = speed_report.run_info(HERE.parent, sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.device}-{args.shape}-{args.mode}-{args.precision}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    speed_report.replace_block(args.readme, "profile", f"`python benchmarks/profile_step.py {' '.join(sys.argv[1:])}`"
                               f" (load avg {result['load_avg']:.1f}):\n\n{table(result)}")
    print(table(result))
    print(f"written {path}")


if __name__ == "__main__":
    main()
