"""Which linear layers to keep out of 4/8-bit quantization, measured: embedding damage per module group.

    python benchmarks/quant_skips.py            # writes benchmarks/results/quant_skips.json, prints the table

For each family, a model with the real base checkpoint's shapes and random weights (seed 0) is run in bf16 on
8 random images and 8 random texts; then one group of linear layers at a time is quantized (nf4, the coarsest
setting) and the pooled embeddings the classifier reads are compared with the bf16 ones: the damage is
1 - cosine similarity, averaged over the examples. A group is worth keeping in bf16 when its damage is large
for the memory it would save. Finally the whole model is quantized with and without the family's skip list,
in nf4, fp4 and int8.

BLIP's vision config initialises its linear layers with std 1e-10, which leaves its encoder layers without effect;
such near-zero layers are redrawn with std 0.02 so that every group is measured on comparable weights.

Caveat: random weights have no trained outlier features, so absolute numbers are optimistic; the comparison
between groups (same weight statistics, same depth) is what the skip lists rest on.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmpeft.backbones import get_family  # noqa: E402
from mmpeft.backbones.shapes import known_config  # noqa: E402
from mmpeft.config import QuantConfig  # noqa: E402
from mmpeft.quant import quantize_linears, skip_patterns  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quant_skips.json"
CHECKPOINTS = {"clip": "openai/clip-vit-base-patch16", "siglip": "google/siglip-base-patch16-224",
               "blip": "Salesforce/blip-itm-base-coco"}
_LAYER = r"\d+"
GROUPS = {
    "clip": {
        "text attention": rf"text_model\.encoder\.layers\.{_LAYER}\.self_attn\..+",
        "text mlp": rf"text_model\.encoder\.layers\.{_LAYER}\.mlp\..+",
        "vision attention": rf"vision_model\.encoder\.layers\.{_LAYER}\.self_attn\..+",
        "vision mlp": rf"vision_model\.encoder\.layers\.{_LAYER}\.mlp\..+",
        "text_projection": r"text_projection",
        "visual_projection": r"visual_projection",
    },
    "siglip": {
        "text attention": rf"text_model\.encoder\.layers\.{_LAYER}\.self_attn\..+",
        "text mlp": rf"text_model\.encoder\.layers\.{_LAYER}\.mlp\..+",
        "text head (projection)": r"text_model\.head",
        "vision attention": rf"vision_model\.encoder\.layers\.{_LAYER}\.self_attn\..+",
        "vision mlp": rf"vision_model\.encoder\.layers\.{_LAYER}\.mlp\..+",
        "vision pooling head mlp": r"vision_model\.head\.mlp\..+",
    },
    "blip": {
        "text self-attention": rf"text_encoder\.encoder\.layer\.{_LAYER}\.attention\..+",
        "text mlp": rf"text_encoder\.encoder\.layer\.{_LAYER}\.(intermediate|output)\..+",
        "text cross-attention (unused)": rf"text_encoder\.encoder\.layer\.{_LAYER}\.crossattention\..+",
        "vision attention": rf"vision_model\.encoder\.layers\.{_LAYER}\.self_attn\..+",
        "vision mlp": rf"vision_model\.encoder\.layers\.{_LAYER}\.mlp\..+",
        "text_proj": r"text_proj",
        "vision_proj": r"vision_proj",
    },
}


def _inputs(config, family: str, n: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    size = config.vision_config.image_size
    length = min(16, config.text_config.max_position_embeddings)
    ids = torch.randint(3, config.text_config.vocab_size - 1, (n, length), generator=gen)
    if family == "clip":
        ids[:, -1] = config.text_config.vocab_size - 1  # legacy CLIP configs pool at the highest id: the last one
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(n, 3, size, size, generator=gen)}


@torch.no_grad()
def _embeddings(model, spec, batch) -> dict[str, torch.Tensor]:
    text = spec.encode_text(model, batch["input_ids"], batch["attention_mask"]).pooled.float()
    image = spec.encode_image(model, batch["pixel_values"]).pooled.float()
    return {"text": text, "vision": image}


def _damage(ref: dict, out: dict) -> dict[str, float]:
    return {k: float(1 - torch.cosine_similarity(ref[k], out[k], dim=-1).mean()) for k in ref}


def _linears(model) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in model.named_modules() if type(m) is nn.Linear}


def _redraw_tiny_linears(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.std() < 1e-4:
            nn.init.normal_(module.weight, std=0.02)


def measure(family: str) -> dict:
    spec = get_family(family)
    config = known_config(CHECKPOINTS[family])
    torch.manual_seed(0)
    model = spec.model_class()(config)
    _redraw_tiny_linears(model)
    model = model.to(torch.bfloat16).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _inputs(config, family)
    ref = _embeddings(model, spec, batch)
    linears = _linears(model)
    total = sum(linears.values())

    def run(quant: QuantConfig, keep: list[str]) -> dict[str, float]:
        fresh = spec.model_class()(config).to(torch.bfloat16).eval()
        fresh.load_state_dict(state)
        quantize_linears(fresh, quant, keep)
        return _damage(ref, _embeddings(fresh, spec, batch))

    nf4 = QuantConfig(bits=4, quant_type="nf4", double_quant=True)
    rows = []
    for group, pattern in GROUPS[family].items():
        members = [n for n in linears if re.fullmatch(pattern, n)]
        others = [re.escape(n) for n in linears if n not in members]
        start = time.perf_counter()
        damage = run(nf4, others)
        rows.append({"group": group, "layers": len(members), "weight_share": sum(linears[n] for n in members) / total,
                     "damage_nf4": damage, "seconds": round(time.perf_counter() - start, 1)})
        print(f"  {family:7s} {group:32s} {rows[-1]['weight_share']:7.2%}  text {damage['text']:.2e}  "
              f"vision {damage['vision']:.2e}", flush=True)
    whole = {}
    both = QuantConfig()
    for label, quant in (("nf4", nf4), ("fp4", QuantConfig(bits=4, quant_type="fp4")), ("int8", QuantConfig(bits=8))):
        whole[label] = {"all linear layers": run(quant, []),
                        "with the skip list": run(quant, skip_patterns(spec, both))}
        print(f"  {family:7s} whole model {label}: {whole[label]}", flush=True)
    return {"checkpoint_shapes": CHECKPOINTS[family], "skip_list": list(spec.quant_skip), "groups": rows,
            "whole_model": whole}


def main() -> None:
    torch.set_num_threads(2)
    started = time.time()
    results = {name: measure(name) for name in (sys.argv[1:] or GROUPS)}
    import bitsandbytes
    import transformers

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "what": "1 - cosine similarity of pooled embeddings, quantized vs bf16, random weights with real shapes",
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": bitsandbytes.__version__},
        "seconds": round(time.time() - started),
        "families": results,
    }, indent=2))
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
