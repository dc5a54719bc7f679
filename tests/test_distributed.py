"""Two CPU ranks through `accelerate launch` (gloo): every tower mode trains under DDP, and 2 ranks x batch b
end where 1 process x batch 2b ends."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_same_saved_weights, write_manifest
from safetensors.torch import load_file

from mmpeft import load_config
from mmpeft.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false", "train.tracker=null", "train.mixed_precision=no", "data.num_workers=0"]


def launch_two_ranks(args: list[str], config: str | None = None) -> subprocess.CompletedProcess:
    """`config`: a file in recipes/accelerate/; default plain DDP."""
    how = (["--config_file", str(ROOT / "recipes" / "accelerate" / config)] if config else
           ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"])
    cmd = ["accelerate", "launch", *how, str(ROOT / "recipes" / "lora_sentiment.py"), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> dict[str, Path]:
    """16 training examples (divisible by 2 ranks x 4) and 15 eval examples (not divisible by 2)."""
    folder = tmp_path_factory.mktemp("ddp-data")
    def rows(n):
        return [{"text": f"a {['red', 'blue'][i % 2]} thing number {i}", "label": ["r", "b"][i % 2],
                 "color": ((200, 30 + 9 * i, 30), (30, 30 + 9 * i, 200))[i % 2]} for i in range(n)]
    return {"train": write_manifest(folder, rows(16), "train.jsonl"), "eval": write_manifest(folder, rows(15), "eval.jsonl")}


# The plain DDP loop fails for CLIP `full` + a fusion head: `logit_scale` is trainable and never used.
@pytest.mark.parametrize("text,vision,head", [("lora", "lora", "full"), ("frozen", "lora", "full"),
                                              ("frozen", "frozen", "full"), ("full", "full", "full")],
                         ids=["lora-both", "text-frozen", "head-only", "full"])
def test_every_tower_mode_trains_on_two_ranks(tmp_path, tiny_paths, ddp_data, text, vision, head):
    out = tmp_path / "ddp"
    run = launch_two_ranks([f"model.name={tiny_paths['clip']}", f"model.text.mode={text}",
                            f"model.vision.mode={vision}", f"head.mode={head}", f"data.train={ddp_data['train']}",
                            f"data.eval={ddp_data['eval']}", "data.batch_size=4", "train.max_steps=3",
                            f"train.output_dir={out}", *QUIET])
    assert run.returncode == 0, run.stderr[-6000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 3
    assert metrics["eval"]["num_samples"] == 15  # gather_for_metrics counts each sample exactly once


@pytest.mark.parametrize("config", [None, "cpu_fsdp2_two_ranks.yaml"], ids=["ddp", "fsdp2"])
def test_two_ranks_end_where_one_process_with_twice_the_batch_ends(tmp_path, tiny_paths, ddp_data, config):
    common = [f"model.name={tiny_paths['clip']}", f"data.train={ddp_data['train']}", f"data.eval={ddp_data['eval']}",
              "model.text.lora.dropout=0", "model.vision.lora.dropout=0", "head.dropout=0", "train.epochs=2",
              "train.lr_lora=5e-3", "train.lr_head=5e-3", *QUIET]
    two = launch_two_ranks([*common, "data.batch_size=4", f"train.output_dir={tmp_path / 'two'}"], config)
    assert two.returncode == 0, two.stderr[-6000:]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["num_processes"] == 2
    train(load_config(None, [*common, "data.batch_size=8", f"train.output_dir={tmp_path / 'one'}"]))
    assert_same_saved_weights(tmp_path / "one", tmp_path / "two")
    moved = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in moved.items() if "lora_B" in k), "LoRA did not train at all"


def test_fsdp2_trains_a_4bit_backbone_on_two_ranks(tmp_path, tiny_paths, ddp_data):
    """QLoRA under FSDP: packed 4-bit weights are stored in the compute dtype so FSDP can flatten them."""
    out = tmp_path / "fsdp-qlora"
    run = launch_two_ranks([f"model.name={tiny_paths['clip']}", "model.quantization.bits=4",
                            f"data.train={ddp_data['train']}", f"data.eval={ddp_data['eval']}", "data.batch_size=4",
                            "train.max_steps=2", f"train.output_dir={out}", *QUIET], "cpu_fsdp2_two_ranks.yaml")
    assert run.returncode == 0, run.stderr[-6000:]
    manifest = json.loads((out / "mmpeft.json").read_text())
    assert manifest["config"]["model"]["quantization"]["bits"] == 4
    assert json.loads((out / "metrics.json").read_text())["num_processes"] == 2


def test_two_rank_retrieval_scores_every_rank_negatives_and_ends_where_one_process_ends(tmp_path, tiny_paths,
                                                                                     ddp_data):
    """Each rank's 4 pairs are scored against all 8 captions and images (gathered with their gradient), so 2 ranks
    x batch 4 train exactly as 1 process x batch 8; a per-rank loss (4 candidates) would end elsewhere."""
    retrieval = str(ROOT / "recipes" / "configs" / "embedded_retrieval.yaml")
    common = [f"model.name={tiny_paths['clip']}", f"data.train={ddp_data['train']}", f"data.eval={ddp_data['eval']}",
              "data.test=null", "train.epochs=2", "train.lr_lora=5e-3", "train.warmup_ratio=0", *QUIET]
    two = launch_two_ranks(["--config", retrieval, *common, "data.batch_size=4", f"train.output_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-6000:]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["num_processes"] == 2
    train(load_config(retrieval, [*common, "data.batch_size=8", f"train.output_dir={tmp_path / 'one'}"]))
    one, two = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys() and any(v.abs().sum() > 0 for k, v in one.items() if "lora_B" in k)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=1e-5, msg=key)
