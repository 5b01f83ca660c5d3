"""The shared surgery: keep, weighted merge with neuron permutations, router rows, top-k."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeshrink.arch import ADAPTERS
from moeshrink.plan import LayerPlan, ModelPlan, NewExpert
from moeshrink.surgery import apply_layer_plan
from moeshrink.testbed.tiny import randomize_routers, tiny_config

FAMILIES = [
    "mixtral",
    "deepseek_v3",
    "gpt_oss",
]  # fused halves, fused + correction bias, interleaved + biases


def _layer(family: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    randomize_routers(model, family)
    return model, ADAPTERS[family].moe_layers(model)[0]


def _outputs(layer, x):
    return torch.stack(
        [layer.expert_outputs(x, torch.full((x.shape[0],), j)) for j in range(layer.num_experts)]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_permuting_neurons_keeps_the_function(family):
    _, layer = _layer(family)
    x = torch.randn(7, layer.hidden_size)
    before = _outputs(layer, x)
    perm = torch.randperm(layer.intermediate_size, generator=torch.Generator().manual_seed(1)).tolist()
    experts = [
        NewExpert(sources=[j], weights=[1.0], permutations=[perm], router_weights=[1.0]) for j in range(8)
    ]
    apply_layer_plan(layer, LayerPlan(layer=layer.index, num_experts_before=8, experts=experts))
    after = _outputs(layer, x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    first = layer.expert_tensors[0]
    assert not torch.equal(layer.param(first.name), layer.param(first.name).clone().zero_())


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_identical_experts_is_the_identity(family):
    _, layer = _layer(family)
    with torch.no_grad():
        for spec in layer.expert_tensors:
            layer.param(spec.name)[5].copy_(layer.param(spec.name)[2])
    x = torch.randn(5, layer.hidden_size)
    expected = layer.expert_outputs(x, torch.full((5,), 2))
    merged = NewExpert(sources=[2, 5], weights=[0.3, 0.7], router_weights=[1.0, 0.0])
    keep = [NewExpert.keep(j) for j in (0, 1, 3)]
    apply_layer_plan(layer, LayerPlan(layer=layer.index, num_experts_before=8, experts=[merged, *keep]))
    torch.testing.assert_close(layer.expert_outputs(x, torch.zeros(5, dtype=torch.long)), expected)
    assert layer.num_experts == 4 and layer.router.weight.shape[0] == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_one_and_zero_equal_pruning(family):
    model_a, a = _layer(family)
    model_b, b = _layer(family)
    kept = [0, 2, 4, 6]
    apply_layer_plan(a, LayerPlan.keep(a.index, 8, kept))
    merged = [NewExpert(sources=[j, j + 1], weights=[1.0, 0.0], router_weights=[1.0, 0.0]) for j in kept]
    apply_layer_plan(b, LayerPlan(layer=b.index, num_experts_before=8, experts=merged))
    for spec in a.expert_tensors:
        torch.testing.assert_close(a.param(spec.name), b.param(spec.name))
    for name, tensor in a.router_tensors().items():
        torch.testing.assert_close(tensor, b.router_tensors()[name])


def test_router_row_is_the_planned_combination():
    _, layer = _layer("deepseek_v3")
    old = {k: v.detach().clone() for k, v in layer.router_tensors().items()}
    new = NewExpert(sources=[1, 3], weights=[0.5, 0.5], router_weights=[0.25, 0.75])
    experts = [new, NewExpert.keep(0), NewExpert.keep(2), NewExpert.keep(4)]
    apply_layer_plan(layer, LayerPlan(layer=layer.index, num_experts_before=8, experts=experts))
    for name, tensor in layer.router_tensors().items():
        torch.testing.assert_close(tensor[0], 0.25 * old[name][1] + 0.75 * old[name][3])
        torch.testing.assert_close(tensor[1], old[name][0])


def test_plan_round_trips_through_json(tmp_path):
    plan = ModelPlan(
        method="frequency",
        budget={"keep": 2},
        top_k=2,
        layers=[LayerPlan.keep(0, 4, [3, 1], scores=[0.1, 0.9, 0.0, 0.5])],
    )
    plan.save(tmp_path / "p.json")
    again = ModelPlan.load(tmp_path / "p.json")
    assert again == plan and again.layers[0].kept == [1, 3]
    with pytest.raises(ValueError, match="outside"):
        LayerPlan.keep(0, 4, [7])
