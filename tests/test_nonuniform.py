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
