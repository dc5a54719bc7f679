"""`mmpeft plan`: estimates checked against the measured peaks in benchmarks/results/, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpeft.cli import main
from mmpeft.plan import GPU_SIZES_GB, estimate, plan

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# benchmark mode -> (plan mode, bits, optimizer)
MODES = {"full_fp32": ("full", 4, "adamw"), "full_fp32_adamw8bit": ("full", 4, "adamw_8bit"),
         "lora_fp32": ("lora", 4, "adamw"), "lora_bf16": ("lora_bf16", 4, "adamw"),
         "lora_int8": ("qlora", 8, "adamw"), "qlora_nf4": ("qlora", 4, "adamw")}


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_estimates_within_25_percent_of_measurements(kind):
    path = RESULTS / f"memory_{kind}.json"
    if not path.is_file():
        pytest.skip(f"no {path.name} measured yet (benchmarks/memory.py on a {kind} machine)")
    results = json.loads(path.read_text())
    run = results["run"]
    checked = []
    for row in results["modes"]:
        base = row["mode"].removesuffix("+gc")
        if base not in MODES or "error" in row:
            continue
        mode, bits, optimizer = MODES[base]
        est = estimate(run["model_shapes"], mode, batch=run["batch"], text_tokens=run["text_tokens"], bits=bits,
                       gradient_checkpointing=row["gradient_checkpointing"], optimizer=optimizer, device=kind)
        measured = row["train_peak_gib"] * 2**30
        checked.append((row["mode"], est.total / measured))
    assert len(checked) >= 10, checked
    off = [(mode, round(ratio, 2)) for mode, ratio in checked if not 0.75 <= ratio <= 1.25]
    assert not off, f"estimate / measured outside [0.75, 1.25]: {off}"


def test_plan_orders_modes_and_checkpointing_helps():
    plain = plan("openai/clip-vit-large-patch14", batch=64)
    assert [e.mode for e in plain] == ["full", "lora", "lora_bf16", "qlora"]
    totals = [e.total for e in plain]
    assert totals == sorted(totals, reverse=True)  # full > LoRA fp32 > LoRA bf16 > QLoRA
    assert plain[0].trainable_params > 400e6 and 4e6 < plain[3].trainable_params < 5e6
    assert plain[3].parts["quantized_weights"] > 0.9 * 300e6  # the towers' linear weights, projections kept
    ckpt = plan("openai/clip-vit-large-patch14", batch=64, gradient_checkpointing=True)
    assert all(c.activations < 0.3 * p.activations for c, p in zip(ckpt, plain))
    # a card that fits a mode fits it at every larger size
    for e in ckpt:
        fits = [e.fits(size) for size in GPU_SIZES_GB]
        assert fits == sorted(fits)


def test_plan_command_prints_the_table(capsys, tmp_path):
    assert main(["plan", "--model", "openai/clip-vit-base-patch16", "--bits", "4", "--batch", "64",
                 "--grad-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "QLoRA, 4-bit towers" in out and "full fine-tune (fp32)" in out
    assert all(f" {size} GB |" in out for size in GPU_SIZES_GB)
    missing = str(tmp_path / "no-such-model")
    assert main(["plan", "--model", missing, "--batch", "8"]) == 2
    assert f"No config for {missing!r}" in capsys.readouterr().err
