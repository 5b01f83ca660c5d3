"""Checkpoints whose tensors do not share one dtype, as real ones ship: DeepSeek-V3 keeps its router
(gate weight and correction bias) in float32 and everything else in bfloat16. Every method runs on
such a model (the merging methods and NAEE used to crash on it: "expected m1 and m2 to have the same
dtype")."""

from __future__ import annotations

import pytest
import torch

import moeshrink
from moeshrink.methods import METHODS
from moeshrink.testbed.tiny import build_tiny_model


@pytest.fixture(scope="module")
def deepseek_bf16(tmp_path_factory):
    path = build_tiny_model("deepseek_v3", tmp_path_factory.mktemp("ds3") / "m", seed=1, dtype=torch.bfloat16)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)  # transformers keeps DeepSeek-V3's router in float32
    assert any(p.dtype == torch.float32 for n, p in model.named_parameters() if "mlp.gate." in n)
    assert any(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "experts" in n)
    return path


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_a_float32_router_with_bfloat16_experts(
    method, deepseek_bf16, calib_file, tmp_path
):
    result = moeshrink.prune(
        deepseek_bf16,
        method,
        keep=4,
        calib=calib_file,
        samples=4,
        seq_len=32,
        output=tmp_path / "o",
        progress=False,
    )
    assert result.plan.num_experts_after == [4, 4]
    assert (tmp_path / "o" / "config.json").is_file()
