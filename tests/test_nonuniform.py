"""Different expert counts per layer: exported with a per-layer config field, reloaded exactly by load_model."""

from __future__ import annotations

import json

import pytest
import torch

import moeshrink
from moeshrink.io.checkpoint import load_model
from moeshrink.plan import LayerPlan
from moeshrink.surgery.apply import PER_LAYER_KEY


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_per_layer_counts_reload_exactly(family, checkpoints, calib_file, tmp_path):
    uniform = moeshrink.prune(
        checkpoints[family], "frequency", keep=4, calib=calib_file, samples=8, seq_len=32, progress=False
    )
    plan = uniform.plan.model_copy()
    plan.layers = [
        LayerPlan.keep(lp.layer, lp.num_experts_before, list(range(8))[i % 3 : i % 3 + k])
        for i, (lp, k) in enumerate(zip(uniform.plan.layers, (6, 4, 2), strict=True))
    ]
    result = moeshrink.apply_plan(checkpoints[family], plan, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[PER_LAYER_KEY] == [6, 4, 2] and config["num_local_experts"] == 6
    card = (tmp_path / "out" / "README.md").read_text()
    assert "6-6" not in card and "per layer: [6, 4, 2]" in card and "cannot load it" in card
    loaded = load_model(tmp_path / "out")
    assert [layer.num_experts for layer in loaded.adapter.moe_layers(loaded.model)] == [6, 4, 2]
    ids = torch.randint(1, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, result.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert (
        moeshrink.inspect(tmp_path / "out").experts_per_layer == [6, 4, 2] == result.after.experts_per_layer
    )
    # opened without the plugin, vLLM's error must not be the user's first clue: card and inspect say it
    assert "moeshrink's plugin" in card and "pip install moeshrink" in card
    assert "moeshrink's plugin" in moeshrink.inspect(tmp_path / "out").to_text()


def test_allocate_global_follows_usage():
    from moeshrink.methods.budget import allocate_global

    concentrated = torch.tensor([90.0, 5, 3, 2, 0, 0, 0, 0])
    spread = torch.ones(8)
    counts = allocate_global({0: concentrated, 1: spread}, total=8, minimum=2)
    assert sum(counts.values()) == 8 and counts[0] < counts[1] and min(counts.values()) >= 2
    grouped = allocate_global({0: concentrated, 1: spread, 2: spread}, total=12, minimum=4, unit=2)
    assert sum(grouped.values()) == 12 and all(c % 2 == 0 and c >= 4 for c in grouped.values())
    with pytest.raises(moeshrink.MoeShrinkError, match="must lie in"):
        allocate_global({0: spread, 1: spread}, total=2, minimum=2)
    with pytest.raises(moeshrink.MoeShrinkError, match="multiple of the 2 routing groups"):
        allocate_global({0: spread, 1: spread}, total=9, minimum=2, unit=2)


@pytest.mark.parametrize("family, method", [("mixtral", "uncurl"), ("deepseek_v3", "reap")])
def test_global_budget_end_to_end(family, method, checkpoints, calib_file, tmp_path):
    result = moeshrink.prune(
        checkpoints[family],
        method,
        keep=4,
        calib=calib_file,
        samples=8,
        seq_len=32,
        global_budget=True,
        output=tmp_path / "out",
        progress=False,
    )
    counts = result.after.experts_per_layer
    assert sum(counts) == 4 * len(counts) and result.plan.budget["scope"] == "global"
    if family == "deepseek_v3":
        assert all(c % 2 == 0 and c >= 4 for c in counts)
    loaded = load_model(tmp_path / "out")
    assert [layer.num_experts for layer in loaded.adapter.moe_layers(loaded.model)] == counts
    ids = torch.randint(1, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, result.model(ids).logits, rtol=1e-5, atol=1e-5)
