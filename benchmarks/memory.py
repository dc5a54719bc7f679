"""Peak memory of fine-tuning modes, each in a fresh process: mmpeft beside the plain transformers + peft loop.

    python benchmarks/memory.py                       # CPU: ViT-B/16 shapes, batch 4, 32 tokens (~10 min, 2 cores)
    python benchmarks/memory.py --model openai/clip-vit-large-patch14 --batch 64 --tokens 77   # on a CUDA GPU

A CLIP with the named checkpoint's shapes and random weights is saved once with `save_pretrained` (fp32, like
the Hub checkpoint) and every mode loads it from there, in its own process, the way a user would. Per mode:
- `load_peak_gib`: the peak while loading (the fp32 checkpoint is read, then converted or quantized);
- `train_peak_gib`: the peak during the training steps, measured after the loading peak has been reset
  (CPU: resident set, VmHWM after `clear_refs`, with freed loading memory returned to the OS first;
  CUDA: `torch.cuda.max_memory_allocated`);
- `baseline_gib`: the process after importing torch / transformers / peft / bitsandbytes, before loading;
- seconds per step and samples/s over the timed steps (absolute times on a shared machine are noise: compare).
Every mode runs the same batch, text length, LoRA settings (r=16, alpha=32, q/k/v/out of both towers) and a
linear head over the concatenated embeddings; `+gc` adds gradient checkpointing (mmpeft modes only). The plain
modes are ANCHORS §1's loop: CLIPModel + peft, base in bf16 for LoRA, fp32 for full fine-tuning, QLoRA through
`BitsAndBytesConfig` with the other parts left in fp32, AdamW, bf16 autocast.

Results go to benchmarks/results/memory_{cpu,cuda}.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MMPEFT_MODES = {
    "full_fp32": ["model.text.mode=full", "model.vision.mode=full", "model.dtype=float32"],
    "full_fp32_adamw8bit": ["model.text.mode=full", "model.vision.mode=full", "model.dtype=float32",
                            "train.optimizer=adamw_8bit"],
    "lora_fp32": ["model.dtype=float32"],
    "lora_bf16": ["model.dtype=bfloat16"],
    "lora_int8": ["model.quantization={bits: 8}"],
    "qlora_nf4": ["model.quantization={bits: 4, quant_type: nf4, double_quant: true}"],
}
PLAIN_MODES = ("plain_full_fp32", "plain_lora_bf16", "plain_lora_int8", "plain_qlora_nf4")
DEFAULT_MODES = [*PLAIN_MODES, *MMPEFT_MODES, *(f"{m}+gc" for m in MMPEFT_MODES if m != "full_fp32_adamw8bit")]


# --- measuring ---------------------------------------------------------------------------------------------------


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def reset_peak() -> None:
    import torch

    gc.collect()
    if _cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # hand freed heap pages back, so the next peak counts what is in use, not what was once used
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident set
        f.write("5")


def peak_gib() -> float:
    import torch

    if _cuda():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 2**20


def _now_gib() -> float:
    import torch

    if _cuda():
        return torch.cuda.memory_allocated() / 2**30
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20


# --- the checkpoint ------------------------------------------------------------------------------------------------


def build_checkpoint(name: str, folder: Path, image_size: int | None = None) -> Path:
    """Random weights with `name`'s shapes (a known Hub id or a local folder), saved like a Hub checkpoint (fp32
    safetensors + tokenizer + processor); `image_size` changes the resolution (and the position embeddings)."""
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    import transformers as tf

    from mmpeft.backbones.shapes import known_config
    from mmpeft.backbones.tokenizers import clip_bpe_tokenizer

    config = tf.AutoConfig.from_pretrained(name) if Path(name).is_dir() else known_config(name)
    if image_size:
        config.vision_config.image_size = image_size
    torch.manual_seed(0)
    siglip = config.model_type == "siglip"
    model = (tf.SiglipModel if siglip else tf.CLIPModel)(config)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    # The full vocabulary from open_clip's shipped CLIP BPE merges (49,408 tokens; SigLIP's sentencepiece model
    # cannot be fetched offline, so its 32,000 ids get a BPE of that size: the cost is the same).
    length = config.text_config.max_position_embeddings
    clip_bpe_tokenizer(config.text_config.vocab_size - 512 - 2, max_length=length).save_pretrained(tmp)
    size = config.vision_config.image_size
    square = {"height": size, "width": size}
    processor = (tf.SiglipImageProcessor(size=square) if siglip
                 else tf.CLIPImageProcessor(size={"shortest_edge": size}, crop_size=square))
    processor.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


# --- one mode, in a child process -----------------------------------------------------------------------------------


def synthetic_batch(config, batch: int, device, seed: int = 0, tokens: int | None = None) -> dict:
    """Identical tensors for every mode (and speed.py's both sides): random ids ending in EOS (the model's full
    length, at most 77, unless `tokens`), random pixels, random labels of 3 classes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tokens = tokens or min(77, config.text_config.max_position_embeddings)
    ids = torch.randint(0, config.text_config.vocab_size - 2, (batch, tokens), generator=gen)
    ids[:, -1] = config.text_config.eos_token_id
    size = config.vision_config.image_size
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(batch, 3, size, size, generator=gen).to(device),
            "labels": torch.randint(0, 3, (batch,), generator=gen).to(device)}


def _mmpeft_setup(mode: str, checkpoint: Path, gc_on: bool):
    from accelerate import Accelerator

    from mmpeft import build_classifier, load_backbone, load_config
    from mmpeft.training.optim import build_optimizer, resolve_mixed_precision

    cfg = load_config(None, [f"model.name={checkpoint}", *MMPEFT_MODES[mode], f"model.gradient_checkpointing={gc_on}",
                             "model.text.lora.dropout=0.0", "model.vision.lora.dropout=0.0", "head.hidden=0",
                             "head.dropout=0.0"])
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision("auto"))
    backbone = load_backbone(cfg.model.name, dtype=cfg.model.dtype, quantization=cfg.model.quantization,
                             device=accelerator.device)
    model = build_classifier(backbone, cfg, ["negative", "neutral", "positive"])
    optimizer = build_optimizer(model, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = __import__("torch").nn.CrossEntropyLoss()

    def step(batch):
        loss = loss_fn(model(**batch).float(), batch["labels"])
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step, backbone.model.config, accelerator.device


def _plain_setup(mode: str, checkpoint: Path):
    """ANCHORS §1: the loop users write today."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, CLIPModel

    device = torch.device("cuda" if _cuda() else "cpu")
    kwargs = {"dtype": torch.float32}
    if mode == "plain_lora_bf16":
        kwargs = {"dtype": torch.bfloat16}
    elif mode == "plain_lora_int8":
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    elif mode == "plain_qlora_nf4":
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant=True,
                                                            bnb_4bit_compute_dtype=torch.bfloat16)}
    if "quantization_config" in kwargs:
        kwargs["device_map"] = {"": device}
    model = CLIPModel.from_pretrained(checkpoint, **kwargs)
    if mode != "plain_full_fp32":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    model.to(device)
    dim = model.config.projection_dim
    head = torch.nn.Linear(2 * dim, 3).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    bf16 = _cuda() or importlib.import_module("mmpeft.training.optim").cpu_supports_bf16()

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"])
            logits = head(torch.cat([out.text_embeds, out.image_embeds], dim=-1))
        torch.nn.functional.cross_entropy(logits.float(), batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step, model.config, device


def run_child(mode: str, checkpoint: Path, batch_size: int, tokens: int, steps: int) -> dict:
    import bitsandbytes  # noqa: F401  (every mode pays the same imports)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import mmpeft  # noqa: F401

    baseline = _now_gib()
    reset_peak()
    started = time.perf_counter()
    base_mode, gc_on = mode.removesuffix("+gc"), mode.endswith("+gc")
    if base_mode in PLAIN_MODES:
        model, step, config, device = _plain_setup(base_mode, checkpoint)
    else:
        model, step, config, device = _mmpeft_setup(base_mode, checkpoint, gc_on)
    load_seconds = time.perf_counter() - started
    load_peak = peak_gib()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = synthetic_batch(config, batch_size, device, tokens=tokens)
    reset_peak()
    after_load = _now_gib()
    model.train()
    step(batch)  # warm-up: optimizer state is created here
    if _cuda():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step(batch)
    if _cuda():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    return {"mode": mode, "baseline_gib": round(baseline, 3), "load_peak_gib": round(load_peak, 3),
            "after_load_gib": round(after_load, 3), "train_peak_gib": round(peak_gib(), 3),
            "seconds_per_step": round(seconds, 3), "samples_per_s": round(batch_size / seconds, 2),
            "load_seconds": round(load_seconds, 1), "trainable_params": trainable,
            "gradient_checkpointing": gc_on, "device": str(device)}


# --- the parent: every mode in a fresh process, then the files ------------------------------------------------------


def _run_info(args) -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "mmpeft", "benchmarks/memory.py"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
        "git_commit": commit, "uncommitted_changes": dirty, "date": time.strftime("%Y-%m-%d"),
        "model_shapes": args.model, "batch": args.batch, "text_tokens": args.tokens, "steps": args.steps,
        "lora": "r=16 alpha=32 q/k/v/out both towers", "head": "linear over concatenated embeddings, 3 classes",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()},
        "machine": {"cpu": cpu, "cores": os.cpu_count(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "measure": "CUDA max_memory_allocated" if torch.cuda.is_available() else "CPU peak resident set (VmHWM)",
    }


def _table(results: dict) -> str:
    """Absolute peaks, and the part above the imports (torch alone maps ~0.6 GiB of libraries on the CPU; a GPU's
    max_memory_allocated has no such floor): ratios to bf16 LoRA without checkpointing on both."""
    rows = results["modes"]
    ref = next((r for r in rows if r["mode"] == "lora_bf16" and "error" not in r), None)
    lines = ["| mode | train peak GiB | above imports GiB | × LoRA bf16 (peak / above imports) | load peak GiB "
             "| s / step | trainable params |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error'][:80]} | | | | | |")
            continue
        net = r["train_peak_gib"] - r["baseline_gib"]
        ratio = ""
        if ref:
            ref_net = ref["train_peak_gib"] - ref["baseline_gib"]
            ratio = f"{r['train_peak_gib'] / ref['train_peak_gib']:.2f} / {net / ref_net:.2f}"
        lines.append(f"| {r['mode']} | {r['train_peak_gib']:.2f} | {net:.2f} | {ratio} | {r['load_peak_gib']:.2f} | "
                     f"{r['seconds_per_step']:.2f} | {r['trainable_params']:,} |")
    return "\n".join(lines)


def _update_readme(kind: str, results: dict, readme: Path) -> None:
    text = readme.read_text() if readme.exists() else ""
    info = results["run"]
    block = (f"<!-- memory-{kind}:start -->\n`{info['command']}` — {info['machine']['cpu']}, {info['machine']['cores']} "
             f"cores{', ' + info['machine']['gpu'] if info['machine']['gpu'] else ''}; {info['model_shapes']} shapes, "
             f"batch {info['batch']}, {info['text_tokens']} tokens; {info['measure']}; baseline after imports "
             f"{results['modes'][0].get('baseline_gib', 0):.2f} GiB; commit {info['git_commit'][:7]}, "
             f"{info['date']}.\n\n{_table(results)}\n<!-- memory-{kind}:end -->")
    pattern = re.compile(rf"<!-- memory-{kind}:start -->.*<!-- memory-{kind}:end -->", re.S)
    text = pattern.sub(block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="openai/clip-vit-base-patch16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES)
    parser.add_argument("--cache", default=os.environ.get("MMPEFT_CACHE", str(Path.home() / ".cache" / "mmpeft")))
    parser.add_argument("--results", default=str(HERE / "results"), help="folder of memory_{cpu,cuda}.json")
    parser.add_argument("--readme", default=str(HERE / "README.md"), help="the README whose table is regenerated")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, Path(args.checkpoint), args.batch, args.tokens, args.steps)))
        return

    import torch

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = build_checkpoint(args.model, Path(args.cache) / "bench" / args.model.replace("/", "--"))
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--child", mode, "--checkpoint", str(checkpoint), "--batch", str(args.batch),
               "--tokens", str(args.tokens), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(found[-1][7:]) if found else {"mode": mode, "error": proc.stderr.strip().splitlines()[-1]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    results = {"run": _run_info(args), "modes": rows}
    out = Path(args.results) / f"memory_{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    _update_readme(kind, results, Path(args.readme))
    print(_table(results))
    print(f"written {out}")


if __name__ == "__main__":
    main()
