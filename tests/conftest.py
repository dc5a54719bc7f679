"""Shared fixtures: tiny checkpoints saved once per session and loaded like a user's local folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mmpeft.testing import build_tiny_backbone

FAMILIES = ("clip", "siglip", "blip")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Built backbones and generated data go to a per-session cache, never the user's home."""
    os.environ["MMPEFT_CACHE"] = str(tmp_path_factory.mktemp("mmpeft-cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP spinning costs 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    """family -> folder of a tiny randomly initialised checkpoint (seed 0)."""
    return {f: build_tiny_backbone(f, tmp_path_factory.mktemp(f"tiny-{f}"), seed=0) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_clip_other_seed(tmp_path_factory) -> Path:
    """Same config as tiny CLIP, other weights: an adapter trained on one must not load onto the other."""
    return build_tiny_backbone("clip", tmp_path_factory.mktemp("tiny-clip-seed1"), seed=1)


def write_manifest(folder: Path, rows: list[dict], name: str = "train.jsonl") -> Path:
    """Writes `rows` as JSONL; each row's `color` (RGB tuple) becomes a 32 px PNG referenced by `image`."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        row = dict(row)
        color = tuple(row.pop("color", (i * 37 % 256, i * 91 % 256, i * 53 % 256)))
        image = f"img_{name.split('.')[0]}_{i}.png"
        Image.new("RGB", (32, 32), color).save(folder / image)
        lines.append(json.dumps({"image": image, **row}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def sixteen_examples(tmp_path) -> Path:
    """16 image+text examples over 2 labels; image colour and words both carry the label."""
    rows = []
    for i in range(16):
        label = ("cat", "dog")[i % 2]
        shade = 40 + 10 * i
        color = (220, shade, 30) if label == "cat" else (30, shade, 220)
        rows.append({"text": f"a photo of a {label} number {i}", "label": label, "color": color})
    return write_manifest(tmp_path / "data", rows)


# --- open_clip and dual-encoder backbones (tests/test_open_clip.py, tests/test_dual.py) --------------------------

TINY_OPEN_CLIP = {"embed_dim": 16, "quick_gelu": True,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory) -> str:
    """`open_clip:<config json>@<safetensors>`: a tiny ViT CLIP saved in open_clip's classic CLIP layout."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny-open-clip")
    config = folder / "tiny-oc-vit.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(1)  # not 0: the seeded random init of a name without weights must differ from this file
    model = open_clip.create_model("tiny-oc-vit", pretrained=None)  # open_clip.CLIP: text parts at the top level
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return f"open_clip:{config}@{folder / 'open_clip_model.safetensors'}"


def _tiny_bert(folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers as tf

    from mmpeft.testing import blip_wordpiece_tokenizer

    tokenizer = blip_wordpiece_tokenizer(max_length=64)
    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    tf.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_hf_vision(folder: Path, kind: str) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if kind == "vit":
        model = tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64))
        processor = tf.ViTImageProcessor(size={"height": 32, "width": 32})
    else:  # a ResNet-50-shaped transformers ResNet, small: the shipped BERT + ResNet-50 recipe's vision tower
        model = tf.ResNetModel(tf.ResNetConfig(embedding_size=8, hidden_sizes=[16, 16, 32, 32], depths=[1, 1, 1, 2],
                                               layer_type="bottleneck"))
        processor = tf.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dual(tmp_path_factory) -> dict[str, str]:
    """Dual-encoder names over tiny checkpoints: a BERT text tower with a torchvision ResNet-18 (BasicBlock,
    BatchNorm), a transformers ViT, a transformers bottleneck ResNet, or a timm ResNet."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny-dual")
    bert = _tiny_bert(root / "bert")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, root / "resnet18.safetensors")
    import timm

    torch.manual_seed(0)
    timm_resnet = timm.create_model("resnet10t", num_classes=0)
    for module in timm_resnet.modules():  # timm zero-initialises each block's last BatchNorm scale: undo it so
        if isinstance(module, torch.nn.BatchNorm2d):  # that LoRA on the block's convolutions gets a gradient
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    save_file({k: v.contiguous() for k, v in timm_resnet.state_dict().items()}, root / "resnet10t.safetensors")
    vit = _tiny_hf_vision(root / "vit", "vit")
    hf_resnet = _tiny_hf_vision(root / "hf-resnet", "resnet")
    return {
        "torchvision": f"dual:text={bert},vision=torchvision:resnet18@{root / 'resnet18.safetensors'},image_size=32",
        "vit": f"dual:text={bert},vision={vit},pooling=mean",
        "hf-resnet": f"dual:text={bert},vision={hf_resnet}",
        "timm": f"dual:text={bert},vision=timm:resnet10t@{root / 'resnet10t.safetensors'},image_size=32",
    }


def assert_same_saved_weights(one: Path, two: Path, atol: float = 1e-5) -> None:
    """Adapter and head saved in two output folders agree tensor by tensor within `atol`."""
    import torch
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "head.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=f"{name}:{key}")


QUICK_TRAIN = ["train.mixed_precision=no", "train.progress=false", "train.tracker=null", "data.num_workers=0",
               "data.batch_size=8", "train.warmup_ratio=0", "train.lr_lora=5e-3", "train.lr_head=1e-2", "head.hidden=16"]


def cat_dog_rows(n: int = 16) -> list[dict]:
    """`n` image+text examples over 2 labels; image colour and words both carry the label."""
    return [{"text": f"a photo of a {('cat', 'dog')[i % 2]} number {i}", "label": ("cat", "dog")[i % 2],
             "color": (220, 40 + 10 * i, 30) if i % 2 == 0 else (30, 40 + 10 * i, 220)} for i in range(n)]


def train_quick_run(base: Path, root: Path, rows: list[dict], steps: int = 2) -> tuple[Path, Path]:
    """A run folder trained for `steps` steps on `rows` (train = eval = test); returns (run folder, manifest)."""
    from mmpeft import load_config, train

    data = write_manifest(root / "data", rows)
    out = root / "run"
    train(load_config(None, [f"model.name={base}", f"train.output_dir={out}", f"data.train={data}",
                             f"data.eval={data}", f"data.test={data}", f"train.max_steps={steps}", *QUICK_TRAIN]))
    return out, data
