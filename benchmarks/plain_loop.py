"""The plain transformers + peft loop of ANCHORS §1: the reference `speed.py` measures mmpeft against.

    python benchmarks/plain_loop.py --shape b32 --mode lora --precision fp32 --steps 10          # step only
    python benchmarks/plain_loop.py --shape b32 --mode lora --manifest train.jsonl --steps 75    # end to end

What a user writes by hand: `CLIPModel` (`SiglipModel` for SigLIP) + peft `get_peft_model` with LoRA r=16
alpha=32 on q_proj/k_proj/v_proj/out_proj of both towers, a linear head over `cat(text_embeds, image_embeds)`,
`torch.optim.AdamW(fused=True)`, gradient clipping at 1.0, bf16 autocast or none. End to end it is fed like the
brief's example: a `DataLoader` with `num_workers=0` (images decoded in the main process) whose collate runs the
image processor and pads every text to the model's full length (77 tokens for CLIP). Prints one `RESULT {json}`
line with the time of every step (data loading included end to end), peaks and trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from memory import build_checkpoint, peak_gib, reset_peak, synthetic_batch  # noqa: E402  (benchmarks/ is no package)

# Short names of the shapes the harness knows: the tiny embedded default and real checkpoints' shapes.
SHAPES = {"tiny": "tiny-clip", "b32": "openai/clip-vit-base-patch32", "b16": "openai/clip-vit-base-patch16",
          "l14": "openai/clip-vit-large-patch14", "siglip": "google/siglip-base-patch16-224"}
MODES = ("full", "lora", "qlora4", "lora8", "probe", "lora_text", "lora_last2")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# lora_text: LoRA on the text tower only, the vision tower frozen (what the feature cache serves)
TEXT_LORA_TARGETS = r"text_model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj"


def last_layers_targets(config, n: int = 2) -> str:
    """lora_last2: LoRA on the last `n` encoder layers of each tower only (what the state cache serves)."""
    towers = []
    for tower, sub in (("text_model", config.text_config), ("vision_model", config.vision_config)):
        layers = "|".join(str(i) for i in range(sub.num_hidden_layers - n, sub.num_hidden_layers))
        towers.append(rf"{tower}\.encoder\.layers\.({layers})")
    return rf"({'|'.join(towers)})\.self_attn\.(q|k|v|out)_proj"


def checkpoint_for(shape: str, cache: Path, image_size: int | None = None) -> Path:
    """The folder both sides load: the shipped tiny CLIP, or random weights with a real checkpoint's shapes;
    `image_size` other than the checkpoint's: random weights of those shapes at that resolution."""
    from mmpeft.backbones.weights import resolve_location

    name = SHAPES[shape]
    if shape == "tiny" and image_size is None:
        return Path(resolve_location(name))
    folder = cache / "bench" / (name.replace("/", "--") + (f"-{image_size}px" if image_size else ""))
    return build_checkpoint(resolve_location(name) if shape == "tiny" else name, folder, image_size=image_size)


def text_length(config) -> int:
    return min(77, config.text_config.max_position_embeddings)


def _load(checkpoint: Path, mode: str, precision: str, device):
    import torch
    from transformers import AutoModel, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16 if precision == "bf16" and mode in ("lora", "lora_text", "lora_last2")
              else torch.float32}
    if mode == "lora8":
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device}}
    elif mode == "qlora4":
        kwargs = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), "device_map": {"": device}}
    return AutoModel.from_pretrained(checkpoint, **kwargs)


def build(checkpoint: Path, mode: str, precision: str, device):
    """The plain model, head, optimizer and one training step (ANCHORS §1); returns (step, trainable, config)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = _load(checkpoint, mode, precision, device)
    if mode in ("lora", "lora8", "qlora4"):
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
    elif mode == "lora_text":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=TEXT_LORA_TARGETS))
    elif mode == "lora_last2":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=last_layers_targets(model.config)))
    elif mode == "probe":
        model.requires_grad_(False)
    model.to(device)
    config = model.config
    dim = getattr(config, "projection_dim", None) or config.text_config.hidden_size
    head = torch.nn.Linear(2 * dim, 3).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    autocast = precision == "bf16"
    model.train()

    def step(batch: dict) -> float:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad() if mode == "probe" else torch.enable_grad():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"])
            logits = head(torch.cat([out.text_embeds, out.image_embeds], dim=-1))
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in params), config


def manifest_loader(manifest: Path, checkpoint: Path, batch: int, seed: int = 0):
    """The brief's feeding: decode and process each image in the main process, pad every text to full length."""
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    labels = {name: i for i, name in enumerate(sorted({r["label"] for r in rows}))}
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    length = text_length(AutoConfig.from_pretrained(checkpoint))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            row = rows[i]
            return Image.open(manifest.parent / row["image"]).convert("RGB"), row["text"], labels[row["label"]]

    def collate(items):
        images, texts, ys = zip(*items)
        text = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return {"pixel_values": processor(images=list(images), return_tensors="pt")["pixel_values"],
                "input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                "labels": torch.tensor(ys)}

    return torch.utils.data.DataLoader(Rows(), batch_size=batch, shuffle=True, num_workers=0, collate_fn=collate,
                                       generator=torch.Generator().manual_seed(seed))


def timed_steps(step, batches, steps: int, device) -> list[float]:
    """Seconds of each step, end to end (the wait for the next batch counts into the step that takes it)."""
    import torch

    cuda = torch.device(device).type == "cuda"
    times, last = [], time.perf_counter()
    for i, batch in enumerate(batches):
        if i >= steps:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        step(batch)
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--mode", choices=MODES, default="lora")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="steps to run (warm-up included); end to end: "
                        "at most one epoch")
    parser.add_argument("--manifest", type=Path, help="JSONL of image/text/label: end to end (else step only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mmpeft")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    checkpoint = checkpoint_for(args.shape, args.cache)
    step, trainable, config = build(checkpoint, args.mode, args.precision, args.device)
    if args.manifest is None:
        batch = synthetic_batch(config, args.batch, args.device, args.seed)
        reset_peak()  # step only: the peak of the steps, as the mmpeft side measures it
        times = timed_steps(step, (batch for _ in range(args.steps)), args.steps, args.device)
    else:
        times = timed_steps(step, manifest_loader(args.manifest, checkpoint, args.batch, args.seed), args.steps,
                            args.device)
    print("RESULT " + json.dumps({"side": "plain", "step_seconds": times, "batch": args.batch,
                                  "peak_memory_gib": peak_gib(), "trainable_parameters": trainable,
                                  "text_tokens": text_length(config)}), flush=True)


if __name__ == "__main__":
    main()
