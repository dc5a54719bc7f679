"""The CPU levers of issue 13 outside the loop: fused AdamW on the CPU, `auto` precision by model width, and the
device-side skip of non-finite steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmpeft.config import TrainConfig
from mmpeft.training import optim
from mmpeft.training.faults import NonFiniteSkip
from mmpeft.training.optim import (
    CPU_BF16_MIN_WIDTH,
    build_optimizer,
    can_fuse,
    median_linear_width,
    resolve_mixed_precision,
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 3))


def _train(model: nn.Module, optimizer, batches, skip: NonFiniteSkip | None = None) -> None:
    for step, (x, y) in enumerate(batches, start=1):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if skip is not None:
            skip.check(loss, model.parameters(), step, grad_norm=norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def test_build_optimizer_fuses_on_cpu_and_matches_unfused():
    fused_model, plain_model = _model(), _model()
    fused = build_optimizer(fused_model, TrainConfig())
    assert fused.defaults["fused"] is True
    groups = [{**g, "params": [dict(plain_model.named_parameters())[n] for n in names]}
              for g, names in zip(fused.param_groups, _group_names(fused_model, fused))]
    plain = torch.optim.AdamW(groups)  # foreach / for-loop kernels, same groups and learning rates
    batches = _batches(5)
    _train(fused_model, fused, batches)
    _train(plain_model, plain, batches)
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(fused_model[0].weight, _model()[0].weight)  # it trained


def _group_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def test_can_fuse_refuses_mixed_devices_and_integers():
    assert can_fuse([torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)])
    assert not can_fuse([torch.zeros(2, dtype=torch.int64)])
    assert not can_fuse([torch.zeros(2), torch.zeros(2, device="meta")])


def test_auto_precision_picks_fp32_for_narrow_models_on_bf16_cpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(optim, "cpu_supports_bf16", lambda: True)
    narrow = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 512), nn.Linear(512, 128))
    wide = nn.Sequential(nn.Linear(768, 768), nn.Linear(768, 3072), nn.Linear(3072, 768))
    assert median_linear_width(narrow) == 128 < CPU_BF16_MIN_WIDTH <= median_linear_width(wide)
    assert resolve_mixed_precision("auto", narrow) == "no"
    assert resolve_mixed_precision("auto", wide) == "bf16"
    assert resolve_mixed_precision("auto") == "bf16"  # no model given: as before
    assert resolve_mixed_precision("no", wide) == "no"
    monkeypatch.setattr(optim, "cpu_supports_bf16", lambda: False)
    assert resolve_mixed_precision("auto", wide) == "no"


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_nonfinite_step_is_skipped_on_the_device(poison):
    """A step with a NaN loss (or an inf gradient) leaves parameters, moments and step count as if its batch had
    never been seen; the count and the first bad step are read once, at the end."""
    batches = _batches(4)
    reference, ref_opt = _model(), None
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)
    _train(reference, ref_opt, [batches[0], batches[2], batches[3]])

    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    skip = NonFiniteSkip(optimizer, "cpu")
    assert skip.on_device
    bad_x = batches[1][0].clone()
    if poison == "loss":
        bad_x[0, 0] = float("nan")
    else:
        bad_x[0, 0] = float("inf")  # finite loss is not guaranteed; the gradient norm is inf or nan
    _train(model, optimizer, [batches[0], (bad_x, batches[1][1]), batches[2], batches[3]], skip)
    assert skip.pending() == (1, 2)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(optimizer.state[model[0].weight]["step"]) == 3
    skip.detach()
    assert not hasattr(optimizer, "found_inf")


def test_nonfinite_skip_reports_nothing_when_all_steps_are_finite():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    skip = NonFiniteSkip(optimizer, "cpu")
    _train(model, optimizer, _batches(2), skip)
    assert skip.pending() == (0, None)


def test_nonfinite_skip_says_when_it_cannot_skip_on_the_device():
    model = _model()
    skip = NonFiniteSkip(torch.optim.AdamW(model.parameters(), foreach=False), "cpu")
    assert not skip.on_device  # the loop keeps its host check for such optimizers


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_towers_run_sdpa_attention(tiny_paths, family):
    """SDPA everywhere transformers has it (BLIP's attention in transformers 5.24 has no SDPA path: eager)."""
    from mmpeft import load_backbone

    config = load_backbone(str(tiny_paths[family])).model.config
    assert {config.text_config._attn_implementation, config.vision_config._attn_implementation} == {"sdpa"}
