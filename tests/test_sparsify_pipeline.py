"""Sparsity inside experts through the real pipeline: patterns on disk, exact accounting, fallbacks, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moeshrink
from moeshrink.arch import ADAPTERS
from moeshrink.engine.observers import LayerStats
from moeshrink.errors import MoeShrinkError
from moeshrink.plan import PLAN_FILENAME
from moeshrink.sparsity import linear_view, magnitude_scores, unstructured_mask
from moeshrink.sparsity.layer import SparsitySpec, sparsify_layer
from moeshrink.testbed.tiny import tiny_config

KW = dict(samples=8, seq_len=32, progress=False)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_nm_pattern_holds_in_every_expert_on_disk(family, checkpoints, calib_file, tmp_path):
    moeshrink.prune(checkpoints[family], "none", calib=calib_file, output=tmp_path / "o", nm="2:4", **KW)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    layers = ADAPTERS[family].moe_layers(model)
    for layer in layers:
        for e in range(layer.num_experts):
            for name in ("gate_up_proj", "down_proj"):
                w, _ = linear_view(layer, name, e)
                groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
                assert (groups <= 2).all()


def test_wanda_after_expert_pruning_has_exact_accounting(checkpoints, calib_file, tmp_path):
    result = moeshrink.prune(
        checkpoints["qwen2_moe"],
        "frequency",
        keep=4,
        calib=calib_file,
        output=tmp_path / "o",
        sparsity=0.5,
        **KW,
    )
    report = result.sparsity
    assert report.expert_fraction == 0.5  # every row of every expert matrix loses exactly half
    tensors = load_file(tmp_path / "o" / "model.safetensors")
    expert_zeros = sum(
        int((t == 0).sum()) for k, t in tensors.items() if ".experts." in k and "shared" not in k
    )
    expert_total = sum(t.numel() for k, t in tensors.items() if ".experts." in k and "shared" not in k)
    assert expert_zeros == expert_total // 2
    shared = [t for k, t in tensors.items() if "shared_expert." in k]
    assert shared and all(int((t == 0).sum()) == 0 for t in shared)  # shared experts stay dense
    assert result.plan.sparsity["method"] == "wanda"
    assert all(lp.sparsity["magnitude_fallback_experts"] == [] for lp in result.plan.layers)
    assert "zeros stored in dense tensors save no memory" in (tmp_path / "o" / "README.md").read_text()
    with pytest.raises(MoeShrinkError, match="rerun moeshrink prune"):
        moeshrink.apply_plan(checkpoints["qwen2_moe"], tmp_path / "o" / PLAN_FILENAME, tmp_path / "again")


def test_an_expert_without_tokens_falls_back_to_magnitude():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    layer = ADAPTERS["mixtral"].moe_layers(model)[0]
    counts = torch.ones(8, dtype=torch.float64)
    counts[5] = 0
    stats = LayerStats(
        num_experts=8,
        counts=counts,
        input_sq=torch.rand(8, layer.hidden_size, dtype=torch.float64),
        intermediate_sq=torch.rand(8, layer.intermediate_size, dtype=torch.float64),
    )
    expected = unstructured_mask(magnitude_scores(linear_view(layer, "gate_up_proj", 5)[0]), 0.5)
    done = sparsify_layer(layer, stats, SparsitySpec(0.5))
    assert done["magnitude_fallback_experts"] == [5]
    assert torch.equal(linear_view(layer, "gate_up_proj", 5)[0] != 0, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "frequency", "keep": 4, "sparsity": 1.0}, r"must be in \[0, 1\)"),
        ({"method": "none", "nm": "3:2"}, "need 0 < N < M"),
        ({"method": "none", "nm": "two:four"}, "takes N:M"),
        ({"method": "none", "keep": 4, "sparsity": 0.5}, "keeps every expert"),
        ({"method": "none"}, "would change nothing"),
        (
            {"method": "none", "sparsity": 0.5, "sparsity_method": "sideways"},
            "sparsity method must be one of",
        ),
    ],
)
def test_bad_sparsity_requests_fail_early(kwargs, message, checkpoints, calib_file, tmp_path):
    with pytest.raises(MoeShrinkError, match=message):
        moeshrink.prune(checkpoints["mixtral"], calib=calib_file, output=tmp_path / "o", **(KW | kwargs))
    assert not (tmp_path / "o").exists()
