"""Nothing printed that the user cannot act on: bitsandbytes' CPU-kernel hint only on a quantized CPU run, no
FutureWarning from peft reading transformers' deprecated property, no more loader workers than cores."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from mmpeft.data import loaders


def _stderr_of(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stderr


@pytest.mark.slow  # three fresh interpreters importing torch + peft: ~45 s on 2 busy cores
def test_bitsandbytes_cpu_kernel_hint_only_when_quantizing():
    pytest.importorskip("bitsandbytes")
    if "gemm_4bit_forward" not in _stderr_of("import peft"):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes prints no kernel hint here")
    # peft imports bitsandbytes whenever it is installed; through mmpeft the hint is held back...
    assert "gemm_4bit_forward" not in _stderr_of("import mmpeft, peft; from mmpeft.models import adapters")
    # ...and said once when 4-bit layers are about to run on the CPU
    replay = _stderr_of("import logging, mmpeft, peft; from mmpeft.quant import check_device; logging.basicConfig(); "
                        "check_device('cpu'); check_device('cpu')")
    assert replay.count("gemm_4bit_forward") == 1 and "WARNING:mmpeft.quant:bitsandbytes: Failed to load" in replay


def test_attaching_adapters_raises_no_future_warning(tiny_paths):
    from mmpeft import build_classifier, load_backbone, load_config

    backbone = load_backbone(str(tiny_paths["clip"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_classifier(backbone, load_config(None, []), ["a", "b"])
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


@pytest.mark.parametrize("cores,requested,used", [(2, 4, 0), (2, 1, 1), (2, 0, 0), (8, 4, 4), (8, 12, 7),
                                                  (3, 4, 2)])
def test_loader_workers_capped_at_the_cores(monkeypatch, caplog, cores, requested, used):
    monkeypatch.setattr(loaders, "available_cores", lambda: cores)
    monkeypatch.setattr(loaders, "_CAPPED", set())
    with caplog.at_level(logging.WARNING, logger="mmpeft.data.loaders"):
        assert loaders.worker_count(requested) == used
        assert loaders.worker_count(requested) == used
    said = [r.getMessage() for r in caplog.records]
    if used == requested:
        assert not said
    else:
        assert said == [f"data.num_workers={requested} but this process has {cores} CPU core(s): using {used} loader "
                        f"worker(s)" + (" (images decoded in the main process)." if not used else ".")]


@pytest.mark.parametrize("cores,used", [(1, 0), (2, 0), (4, 2), (16, 8), (64, 8)])
def test_loader_workers_picked_from_the_machine_by_default(monkeypatch, caplog, cores, used):
    """`data.num_workers: null` (the default): none on 2 cores, where a worker competes with the step (6.5 vs 5.5
    samples/s in issue 13's measurement), else half the cores, at most 8; nothing to warn about."""
    monkeypatch.setattr(loaders, "available_cores", lambda: cores)
    with caplog.at_level(logging.WARNING, logger="mmpeft.data.loaders"):
        assert loaders.worker_count(None) == used
    assert not caplog.records
