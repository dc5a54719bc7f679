"""What the run's mixed precision changes in the backbone (`mmpeft/models/precision.py`): under bf16 the frozen
weights are stored in bf16 (adapters and head stay fp32) and CPU attention runs eager; a full tower, an explicit
dtype, fp32 runs and quantization keep the loaded weights, each with its reason in metrics.json."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mmpeft import load_backbone, load_config, train
from mmpeft.models.precision import bf16_storage_blocker, fit_backbone_to_precision, keep_trainable_fp32

FAST = ["train.progress=false", "train.tracker=null", "data.num_workers=0", "data.batch_size=4", "head.hidden=8",
        "train.max_steps=2"]


def _fit(path, *overrides, mixed="bf16"):
    cfg = load_config(None, [f"model.name={path}", *overrides])
    backbone = load_backbone(cfg.model.name, dtype=cfg.model.dtype)
    return backbone, fit_backbone_to_precision(backbone, cfg.model, mixed, torch.device("cpu"))


def _attention(backbone) -> set[str]:
    from mmpeft.models.precision import transformers_models

    return {m.config._attn_implementation for m in transformers_models(backbone.model)}


def test_bf16_run_stores_frozen_weights_in_bf16_and_runs_eager_attention_on_cpu(tiny_paths):
    backbone, chosen = _fit(tiny_paths["clip"])
    assert {p.dtype for p in backbone.model.parameters()} == {torch.bfloat16}
    assert chosen["weights"].startswith("bfloat16: stored in bf16") and chosen["attention"].startswith("eager")
    assert _attention(backbone) == {"eager"}


@pytest.mark.parametrize(("overrides", "mixed", "reason"), [
    (["model.vision.mode=full"], "bf16", "model.vision.mode=full"),
    (["model.dtype=float32"], "bf16", "model.dtype=float32 is set"),
    ([], "no", "mixed precision 'no'"),
])
def test_weights_stay_fp32_with_the_reason(tiny_paths, overrides, mixed, reason):
    backbone, chosen = _fit(tiny_paths["clip"], *overrides, mixed=mixed)
    assert {p.dtype for p in backbone.model.parameters()} == {torch.float32}
    assert chosen["weights"].startswith("float32: ") and reason in chosen["weights"]
    if mixed == "no":
        assert _attention(backbone) == {"sdpa"} and chosen["attention"].startswith("as loaded")


def test_explicit_attention_and_the_other_blockers(tiny_paths):
    backbone, chosen = _fit(tiny_paths["clip"], "model.attn_implementation=sdpa")
    assert _attention(backbone) == {"sdpa"} and chosen["attention"] == "sdpa: model.attn_implementation=sdpa"
    cfg = load_config(None, ["model.quantization.bits=4"])
    assert "quantized" in bf16_storage_blocker(cfg.model, "bf16", sharded=False)
    assert "FSDP" in bf16_storage_blocker(load_config(None, []).model, "bf16", sharded=True)
    assert bf16_storage_blocker(load_config(None, []).model, "bf16", sharded=False) is None


def test_keep_trainable_fp32_casts_only_trainable_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    assert keep_trainable_fp32(model) == 2
    assert [p.dtype for p in model.parameters()] == [torch.bfloat16] * 2 + [torch.float32] * 2


def test_bf16_training_run_keeps_adapters_fp32_and_records_the_choices(tiny_paths, sixteen_examples, tmp_path):
    out = tmp_path / "run"
    metrics = train(load_config(None, [f"model.name={tiny_paths['clip']}", f"train.output_dir={out}",
                                       f"data.train={sixteen_examples}", "train.mixed_precision=bf16", *FAST]))
    assert metrics["mixed_precision"] == "bf16"
    assert metrics["precision"]["weights"].startswith("bfloat16") and metrics["precision"]["attention"].startswith(
        "eager")
    assert json.loads((out / "metrics.json").read_text())["precision"] == metrics["precision"]
    saved = {}
    for weights in out.rglob("*.safetensors"):
        saved.update(load_file(weights))
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
