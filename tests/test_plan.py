"""`mmpeft plan`: estimates checked against the measured peaks in benchmarks/results/, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpeft.backbones import BackboneError
from mmpeft.cli import main
from mmpeft.plan import GPU_SIZES_GB, estimate, plan

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# benchmark mode -> (plan mode, bits, optimizer)
MODES = {"full_fp32": ("full", 4, "adamw"), "full_fp32_adamw8bit": ("full", 4, "adamw_8bit"),
         "lora_fp32": ("lora", 4, "adamw"), "lora_bf16": ("lora_bf16", 4, "adamw"),
         "lora_int8": ("qlora", 8, "adamw"), "qlora_nf4": ("qlora", 4, "adamw")}


def _measured(kind: str) -> tuple[dict, list[dict]]:
    """The run record and the usable rows of benchmarks/results/memory_<kind>.json (benchmarks/memory.py)."""
    path = RESULTS / f"memory_{kind}.json"
    if not path.is_file():
        pytest.skip(f"no {path.name}: run `python benchmarks/memory.py` on a {kind} machine to measure it")
    results = json.loads(path.read_text())
    rows = [row for row in results["modes"] if row["mode"].removesuffix("+gc") in MODES and "error" not in row]
    return results["run"], rows


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_estimates_predict_held_out_measurements(kind, monkeypatch):
    """Two-fold: the planner's fitted constants (activation transient factor; on the CPU the libraries' resident
    set) are fitted on half the measured modes and must predict the other half within 25 %, and vice versa."""
    import numpy as np

    from mmpeft import plan as planner

    run, rows = _measured(kind)
    assert len(rows) >= 10, [row["mode"] for row in rows]
    monkeypatch.setattr(planner, "TRANSIENT_FACTOR", 1.0)
    monkeypatch.setattr(planner, "CPU_RUNTIME_GIB", 0.0)
    parts = []  # (mode, bytes fixed by the shapes, raw activations, measured)
    for row in rows:
        mode, bits, optimizer = MODES[row["mode"].removesuffix("+gc")]
        est = estimate(run["model_shapes"], mode, batch=run["batch"], text_tokens=run["text_tokens"], bits=bits,
                       gradient_checkpointing=row["gradient_checkpointing"], optimizer=optimizer, device=kind)
        parts.append((row["mode"], est.total - est.activations, est.activations, row["train_peak_gib"] * 2**30))
    off = []
    for fit, held in ((parts[::2], parts[1::2]), (parts[1::2], parts[::2])):
        columns = lambda activations: [activations] + ([2**30] if kind == "cpu" else [])  # noqa: E731
        solution = np.linalg.lstsq(np.array([columns(a) for _, _, a, _ in fit]),
                                   np.array([m - fixed for _, fixed, _, m in fit]), rcond=None)[0]
        assert 0.5 < solution[0] < 4, f"fitted transient factor {solution[0]:.2f}"
        for mode, fixed, activations, measured in held:
            ratio = (fixed + np.dot(columns(activations), solution)) / measured
            if not 0.75 <= ratio <= 1.25:
                off.append((mode, round(float(ratio), 2)))
    assert not off, f"held-out estimate / measured outside [0.75, 1.25]: {off}"


def test_shipped_constants_match_every_measurement():
    """The constants in mmpeft/plan.py, over all CPU measurements (what `mmpeft plan` prints)."""
    run, rows = _measured("cpu")
    ratios = []
    for row in rows:
        mode, bits, optimizer = MODES[row["mode"].removesuffix("+gc")]
        est = estimate(run["model_shapes"], mode, batch=run["batch"], text_tokens=run["text_tokens"], bits=bits,
                       gradient_checkpointing=row["gradient_checkpointing"], optimizer=optimizer, device="cpu")
        ratios.append((row["mode"], round(est.total / (row["train_peak_gib"] * 2**30), 2)))
    assert all(0.75 <= r <= 1.25 for _, r in ratios), ratios


def test_plan_names_the_families_it_covers():
    for name in ("open_clip:ViT-B-16", "dual:text=bert-base-uncased,vision=torchvision:resnet50"):
        with pytest.raises(BackboneError, match=r"covers the transformers families \(clip, siglip, blip"):
            plan(name)
    assert main(["plan", "--model", "open_clip:ViT-B-16"]) == 2


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
