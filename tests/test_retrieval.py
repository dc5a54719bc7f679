"""Retrieval fine-tuning (`task=retrieval`): the world's caption set, recall@k and the contrastive loss by hand,
a LoRA run that must beat zero-shot, the saved adapter through stock peft, the recipe, and bad configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_manifest

from mmpeft import DataError, contrastive_loss, load_adapter, load_config, load_retrieval_model, train
from mmpeft.training.metrics import retrieval_metrics
from mmpeft.world.retrieval import retrieval_pair, write_retrieval

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.mixed_precision=no", "train.progress=false", "train.tracker=null", "data.num_workers=0"]
SMALL = {"train": 32, "val": 3, "test": 3}


@pytest.fixture(scope="module")
def world32(tmp_path_factory) -> dict[str, Path]:
    return write_retrieval(tmp_path_factory.mktemp("world32"), sizes=SMALL)


@pytest.fixture(scope="module")
def trained(tiny_paths, world32, tmp_path_factory) -> tuple[Path, dict]:
    """LoRA on both towers of a random tiny CLIP, trained and evaluated on the same 32 pairs (it must memorise)."""
    out = tmp_path_factory.mktemp("retrieval") / "run"
    cfg = load_config(None, [f"model.name={tiny_paths['clip']}", "task=retrieval", f"data.train={world32['train']}",
                             f"data.eval={world32['train']}", f"data.test={world32['test']}", "data.batch_size=32",
                             "train.epochs=40", "train.eval_every=20", "train.lr_lora=1e-2", "train.warmup_ratio=0",
                             f"train.output_dir={out}", *FAST])
    return out, train(cfg)


def test_world_writer_is_deterministic_label_free_and_holds_out_pairs_from_training(tmp_path):
    one, two = write_retrieval(tmp_path / "a", sizes=SMALL), write_retrieval(tmp_path / "b", sizes=SMALL)
    for split in SMALL:
        assert one[split].read_bytes() == two[split].read_bytes()
        rows = [json.loads(line) for line in one[split].read_text().splitlines()]
        assert len(rows) == SMALL[split] and all("label" not in row and row["text"] for row in rows)
        for row in rows:
            assert (tmp_path / "a" / row["image"]).read_bytes() == (tmp_path / "b" / row["image"]).read_bytes()
    stamp = one["train"].stat().st_mtime_ns
    assert write_retrieval(tmp_path / "a", sizes=SMALL) == one and one["train"].stat().st_mtime_ns == stamp  # reused
    # Splits come from disjoint streams; only evaluation splits show held-out colour-shape pairs.
    pairs = {split: [retrieval_pair(0, split, i) for i in range(120)] for split in ("train", "val", "test")}
    assert not any(scene.held_out for scene, _ in pairs["train"])
    assert all(5 < sum(scene.held_out for scene, _ in pairs[split]) < 40 for split in ("val", "test"))
    assert pairs["val"][:5] != pairs["test"][:5] != pairs["train"][:5]
    assert retrieval_pair(1, "train", 0) != retrieval_pair(0, "train", 0)


def test_recall_at_k_and_split_loss_by_hand():
    # Image embeddings are the unit vectors, so the similarity matrix (image row, caption column) is text.T.
    sim = torch.tensor([[0.9, 0.1, 0.5],   # image 0: its caption first                    -> rank 0
                        [0.8, 0.2, 0.3],   # image 1: two captions above its own           -> rank 2
                        [0.1, 0.7, 0.7]])  # image 2: a tie with caption 1 counts against  -> rank 1
    image, text = torch.eye(3), sim.t().contiguous()
    # Captions (columns): 0 -> rank 0; 1 -> image 2 (0.7) above image 1 (0.2) -> rank 1; 2 -> rank 0.
    metrics = retrieval_metrics(image, text, logit_scale=2.0, ks=(1, 2, 10))
    expected = {"i2t_recall@1": 1 / 3, "i2t_recall@2": 2 / 3, "i2t_recall@10": 1.0,  # k beyond the split: all hits
                "t2i_recall@1": 2 / 3, "t2i_recall@2": 1.0, "t2i_recall@10": 1.0}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["recall_mean"] == pytest.approx(sum(expected.values()) / 6)
    rows = [math.log(sum(math.exp(2 * s) for s in row)) - 2 * row[i] for i, row in enumerate(sim.tolist())]
    cols = [math.log(sum(math.exp(2 * s) for s in col)) - 2 * col[j] for j, col in enumerate(sim.t().tolist())]
    assert metrics["loss"] == pytest.approx((sum(rows) / 3 + sum(cols) / 3) / 2, rel=1e-6)
    assert metrics["loss"] == pytest.approx(float(contrastive_loss(2.0 * sim)), rel=1e-6)
    assert retrieval_metrics(image, text, logit_scale=2.0, ks=(1, 2, 10), chunk=2) == metrics  # chunked rows
    # A collapsed model (every embedding alike) ties everywhere: no hits, not all hits.
    same = torch.ones(4, 2) / math.sqrt(2)
    assert retrieval_metrics(same, same, logit_scale=1.0, ks=(1, 3))["recall_mean"] == 0.0


def test_contrastive_loss_is_the_symmetric_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    e = math.exp
    image_to_text = (-math.log(e(2) / (e(2) + e(0))) - math.log(e(3) / (e(1) + e(3)))) / 2
    text_to_image = (-math.log(e(2) / (e(2) + e(1))) - math.log(e(3) / (e(0) + e(3)))) / 2
    assert float(contrastive_loss(logits)) == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-6)


def test_lora_on_both_towers_learns_what_zero_shot_does_not(trained):
    out, results = trained
    before, after = results["zero_shot_eval"], results["eval"]
    for direction in ("i2t", "t2i"):
        assert before[f"{direction}_recall@1"] <= 0.2, before  # a random tiny CLIP: near chance (1/32)
        assert after[f"{direction}_recall@1"] >= 0.5, after
        assert after[f"{direction}_recall@1"] >= before[f"{direction}_recall@1"] + 0.4
    assert after["loss"] < before["loss"] - 1.0
    assert results["zero_shot_test"]["num_samples"] == 3 and results["test"]["num_samples"] == 3
    assert [h["step"] for h in results["history"]] == [20, 40]
    assert results["trainable_parameters"]["text"]["trainable"] > 0
    assert results["trainable_parameters"]["vision"]["trainable"] > 0
    assert json.loads((out / "metrics.json").read_text())["eval"] == after
    manifest = json.loads((out / "mmpeft.json").read_text())
    assert manifest["task"] == "retrieval" and manifest["config"]["train"]["metric_for_best"] == "recall_mean"
    assert (out / "adapter_config.json").is_file() and not (out / "head.safetensors").exists()


def test_saved_adapter_loads_through_stock_peft_and_mmpeft_with_equal_outputs(trained, tiny_paths, world32):
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import CLIPModel

    from mmpeft.data.loaders import make_loader
    from mmpeft.data.manifest import read_split
    from mmpeft.training.evaluation import evaluate_retrieval

    out, results = trained
    ours = load_retrieval_model(out)
    split = read_split(world32["train"], require_labels=False)
    loader, _ = make_loader(split, None, ours.source, ours.config.data, train=False)
    # The reloaded model reproduces the training run's final evaluation exactly (fp32 throughout).
    assert evaluate_retrieval(ours, loader, Accelerator(cpu=True)) == results["eval"]

    stock = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_paths["clip"]), str(out)).eval()
    batch = next(iter(loader))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        image, text = ours(**inputs, embed=True)
        reference = stock(**inputs)
        stock_image = stock.get_image_features(pixel_values=inputs["pixel_values"])
        stock_image = getattr(stock_image, "pooler_output", stock_image)  # transformers 5 wraps it
        torch.testing.assert_close(ours(**inputs), reference.logits_per_image)
        torch.testing.assert_close(image, torch.nn.functional.normalize(stock_image, dim=-1))
    assert ours(**inputs).shape == (len(text), len(text))
    with pytest.raises(ValueError, match=r"holds a retrieval model .*load_retrieval_model"):
        load_adapter(out)


def test_mmpeft_eval_scores_a_retrieval_model_as_the_run_did(trained, world32, tmp_path, capsys):
    from mmpeft.cli import main as cli_main

    out, results = trained
    written = tmp_path / "eval.json"
    assert cli_main(["eval", "--adapter", str(out), "--data", str(world32["train"]), "--num-workers", "0",
                     "--output", str(written)]) == 0
    scored = json.loads(written.read_text())
    assert {k: v for k, v in scored.items() if k != "data"} == results["eval"]
    assert "image->text" in capsys.readouterr().out


def test_recipe_on_two_ranks_trains_the_embedded_world_set_and_counts_every_pair_once(tmp_path, tiny_paths):
    """The recipe as users launch it, on 2 CPU ranks; 512 test pairs in eval batches of 12 split unevenly, and
    the gathered recall must equal one process's."""
    from accelerate import Accelerator

    from mmpeft.data.loaders import make_loader
    from mmpeft.data.manifest import read_split
    from mmpeft.training.evaluation import evaluate_retrieval

    out = tmp_path / "run"
    run = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(ROOT / "recipes" / "lora_retrieval.py"),
                          "--config", str(ROOT / "recipes" / "configs" / "embedded_retrieval.yaml"),
                          f"model.name={tiny_paths['clip']}", f"train.output_dir={out}", "train.max_steps=2",
                          "data.batch_size=8", "data.eval_batch_size=12", *FAST],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "zero-shot test (512 pairs)" in run.stdout and "test  i2t_recall@1 " in run.stdout
    assert run.stdout.count("zero-shot vs fine-tuned") == 1  # the comparison, printed by the main process only
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 2
    assert metrics["data"]["train"]["examples"] == 1024
    assert metrics["zero_shot_eval"]["num_samples"] == metrics["eval"]["num_samples"] == 256
    assert metrics["zero_shot_test"]["num_samples"] == metrics["test"]["num_samples"] == 512

    model = load_retrieval_model(out)
    split = read_split(metrics["data"]["test"]["manifest"], require_labels=False)
    loader, _ = make_loader(split, None, model.source, model.config.data, train=False)
    one = evaluate_retrieval(model, loader, Accelerator(cpu=True))
    for key, value in one.items():
        assert metrics["test"][key] == pytest.approx(value, abs=1e-6), key


def test_recipe_without_config_runs_the_embedded_retrieval_config():
    sys.path.insert(0, str(ROOT / "recipes"))
    from lora_retrieval import DEFAULT_CONFIG, recipe_config

    assert DEFAULT_CONFIG == ROOT / "recipes" / "configs" / "embedded_retrieval.yaml"
    assert recipe_config([]) == load_config(DEFAULT_CONFIG)
    assert recipe_config([]).task == "retrieval" and recipe_config([]).data.train is None
    with pytest.raises(ValueError, match="metric_for_best=macro_f1` is not a retrieval metric"):
        recipe_config(["--config", str(ROOT / "recipes" / "configs" / "embedded_sentiment.yaml")])


def test_bad_retrieval_configs_name_the_key(tmp_path, tiny_paths):
    assert load_config(None, ["task=retrieval"]).train.metric_for_best == "recall_mean"  # auto, per task
    assert load_config(None, []).train.metric_for_best == "macro_f1"
    with pytest.raises(ValueError, match=r"`task` must be one of \['classification', 'retrieval'\], got 'detection'"):
        load_config(None, ["task=detection"])
    with pytest.raises(ValueError, match=r"`train.metric_for_best=macro_f1` is not a retrieval metric.*recall_mean"):
        load_config(None, ["task=retrieval", "train.metric_for_best=macro_f1"])
    with pytest.raises(ValueError, match=r"`train.metric_for_best=recall_mean` is not a classification metric"):
        load_config(None, ["train.metric_for_best=recall_mean"])
    with pytest.raises(ValueError, match=r"`task=retrieval` trains the towers.*model.text.mode"):
        load_config(None, ["task=retrieval", "model.text.mode=frozen", "model.vision.mode=frozen"])
    # A label-only manifest (no captions) cannot train retrieval, whatever the head would read.
    labels_only = write_manifest(tmp_path / "data", [{"label": ("cat", "dog")[i % 2]} for i in range(6)])
    cfg = load_config(None, [f"model.name={tiny_paths['clip']}", "task=retrieval", f"data.train={labels_only}",
                             "head.type=image_only", "model.text.mode=lora", f"train.output_dir={tmp_path / 'out'}",
                             *FAST])
    with pytest.raises(DataError, match=r"missing column 'text' \(set data.text_column"):
        train(cfg)
