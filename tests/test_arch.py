"""Adapters: every family is found, viewed and routed exactly as transformers does it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeshrink.arch import ADAPTERS, get_adapter, split_router_output
from moeshrink.errors import MoeShrinkError
from moeshrink.testbed.tiny import randomize_routers, tiny_config

from .conftest import FAMILIES


def _model(family: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    randomize_routers(model, family, seed=0)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_views_every_moe_layer(family):
    model = _model(family)
    adapter = get_adapter(model.config)
    layers = adapter.moe_layers(model)
    dense = model.config.first_k_dense_replace if family.startswith("deepseek") else 0
    assert [layer.index for layer in layers] == list(range(dense, model.config.num_hidden_layers))
    for layer in layers:
        assert layer.num_experts == adapter.num_experts(model.config) == 8
        assert layer.top_k == 2
        for spec in layer.expert_tensors:
            assert layer.param(spec.name).shape[0] == 8
        assert layer.intermediate_size in (
            model.config.intermediate_size,
            getattr(model.config, "moe_intermediate_size", 0),
        )
    if family in ("qwen2_moe", "deepseek_v2", "deepseek_v3"):
        assert all(layer.shared_modules for layer in layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_rule_equals_the_router(family):
    model = _model(family)
    layer = ADAPTERS[family].moe_layers(model)[0]
    hidden = torch.randn(64, layer.hidden_size)
    with torch.no_grad():
        logits, weights, index = split_router_output(layer.router(hidden))
        ours_w, ours_i = layer.route(logits)
    # Compare as token -> {expert: weight} maps: some routers return unsorted top-k.
    for t in range(hidden.shape[0]):
        theirs = dict(zip(index[t].tolist(), weights[t].float().tolist(), strict=True))
        ours = dict(zip(ours_i[t].tolist(), ours_w[t].tolist(), strict=True))
        assert theirs.keys() == ours.keys()
        for e in theirs:
            assert ours[e] == pytest.approx(theirs[e], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_routing_never_picks_a_masked_expert(family):
    model = _model(family)
    layer = ADAPTERS[family].moe_layers(model)[0]
    allowed = torch.tensor([True, False] * 4)  # two of four per DeepSeek group stay
    with torch.no_grad():
        logits = split_router_output(layer.router(torch.randn(128, layer.hidden_size)))[0]
        _, index = layer.route(logits, allowed)
    assert allowed[index].all()


def test_expert_outputs_match_a_hand_computed_swiglu():
    model = _model("mixtral")
    layer = ADAPTERS["mixtral"].moe_layers(model)[0]
    x = torch.randn(5, layer.hidden_size)
    j = 3
    gate_up = layer.param("gate_up_proj")[j]
    inter = layer.intermediate_size
    expected = (torch.nn.functional.silu(x @ gate_up[:inter].T) * (x @ gate_up[inter:].T)) @ layer.param(
        "down_proj"
    )[j].T
    got = layer.expert_outputs(x, torch.full((5,), j))
    torch.testing.assert_close(got, expected)


def test_dense_model_is_refused_with_the_supported_families():
    from transformers import LlamaConfig

    with pytest.raises(MoeShrinkError, match="not a mixture-of-experts model.*mixtral"):
        get_adapter(LlamaConfig())


def test_unknown_moe_family_is_refused_with_the_supported_list():
    from transformers import DbrxConfig

    with pytest.raises(MoeShrinkError, match="'dbrx' is not supported yet; supported families: .*qwen3_moe"):
        get_adapter(DbrxConfig(ffn_config={"moe_num_experts": 4}))
