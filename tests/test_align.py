"""Neuron alignment: permuted copies are aligned back exactly, by weights and by activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from moeshrink.arch import ADAPTERS
from moeshrink.errors import MoeShrinkError
from moeshrink.plan import LayerPlan, NewExpert
from moeshrink.surgery import apply_layer_plan
from moeshrink.surgery.align import activation_matching, align_to_anchor, weight_matching
from moeshrink.testbed.tiny import randomize_routers, tiny_config

# fused halves (two families), fused + correction bias, transposed + interleaved + biases
FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"]
ANCHOR, COPY = 1, 6


def _layer(family: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    randomize_routers(model, family)
    layer = ADAPTERS[family].moe_layers(model)[0]
    with torch.no_grad():  # GPT-OSS starts with zero biases: make them count
        for spec in layer.expert_tensors:
            if spec.name.endswith("_bias"):
                layer.param(spec.name).normal_(0, 0.05)
    return model, layer


def _hidden(layer, tokens: int = 300, seed: int = 2) -> torch.Tensor:
    return torch.randn(tokens, layer.hidden_size, generator=torch.Generator().manual_seed(seed))


def _perm(layer, seed: int = 3) -> list[int]:
    return torch.randperm(layer.intermediate_size, generator=torch.Generator().manual_seed(seed)).tolist()


def _down(layer, inter: torch.Tensor, expert: int) -> torch.Tensor:
    spec = next(t for t in layer.expert_tensors if t.name == "down_proj")
    w = layer.param("down_proj")[expert]
    out = inter @ w if spec.neuron_dim == 0 else F.linear(inter, w)
    if any(t.name == "down_proj_bias" for t in layer.expert_tensors):
        out = out + layer.param("down_proj_bias")[expert]
    return out


def _permuted(layer, expert: int, perm: list[int]) -> dict[str, torch.Tensor]:
    out = {}
    for spec in layer.expert_tensors:
        t = layer.param(spec.name)[expert]
        if spec.neuron_dim is not None:
            t = t.index_select(spec.neuron_dim, spec.neuron_index(torch.tensor(perm)))
        out[spec.name] = t
    return out


def _copy_permuted(layer, source: int, slot: int, perm: list[int]) -> None:
    """Through the plan: expert ``slot`` becomes ``source`` with neurons permuted by ``perm``."""
    experts = [NewExpert.keep(j) for j in range(layer.num_experts)]
    experts[slot] = NewExpert(sources=[source], weights=[1.0], permutations=[perm], router_weights=[1.0])
    apply_layer_plan(
        layer, LayerPlan(layer=layer.index, num_experts_before=layer.num_experts, experts=experts)
    )


def _is_perm(perm, size: int) -> bool:
    return sorted(perm) == list(range(size))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scale", [1.0, 30.0])  # x30 drives GPT-OSS's gate/up past its clamp limit
def test_intermediate_then_down_is_the_expert_output(family, scale):
    _, layer = _layer(family)
    x = scale * _hidden(layer, tokens=9)
    for j in (0, 5):
        inter = layer.intermediate(x, j)
        assert inter.shape == (9, layer.intermediate_size)
        expected = layer.expert_outputs(x, torch.full((9,), j))
        torch.testing.assert_close(_down(layer, inter, j), expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_features_follow_the_plan_permutation(family):
    _, layer = _layer(family)
    perm = _perm(layer)
    before = layer.neuron_features(ANCHOR)
    assert before.shape[0] == layer.intermediate_size and before.dtype == torch.float32
    _copy_permuted(layer, ANCHOR, COPY, perm)
    assert torch.equal(layer.neuron_features(COPY), before[perm])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["weight", "activation"])
def test_a_permuted_copy_is_aligned_back_exactly(family, method):
    _, layer = _layer(family)
    perm = _perm(layer)
    _copy_permuted(layer, ANCHOR, COPY, perm)
    if method == "weight":
        found = weight_matching(layer, ANCHOR, COPY)
    else:
        found = activation_matching(layer, ANCHOR, COPY, _hidden(layer))
    assert [perm[i] for i in found] == list(range(layer.intermediate_size))
    aligned = _permuted(layer, COPY, found)
    for spec in layer.expert_tensors:
        assert torch.equal(aligned[spec.name], layer.param(spec.name)[ANCHOR]), spec.name


@pytest.mark.parametrize("family", FAMILIES)
def test_aligned_merge_of_a_permuted_copy_is_the_original(family):
    _, layer = _layer(family)
    _copy_permuted(layer, ANCHOR, COPY, _perm(layer))
    perms = align_to_anchor(layer, ANCHOR, [ANCHOR, COPY])
    assert perms[ANCHOR] is None
    x = _hidden(layer, tokens=11)
    expected = layer.expert_outputs(x, torch.full((11,), ANCHOR))

    def merged(permutations):
        merge = NewExpert(
            sources=[ANCHOR, COPY], weights=[0.5, 0.5], permutations=permutations, router_weights=[0.5, 0.5]
        )
        experts = [merge, *(NewExpert.keep(j) for j in (0, 2, 3))]
        _, fresh = _layer(family)
        _copy_permuted(fresh, ANCHOR, COPY, _perm(layer))
        apply_layer_plan(fresh, LayerPlan(layer=fresh.index, num_experts_before=8, experts=experts))
        return fresh.expert_outputs(x, torch.zeros(11, dtype=torch.long))

    torch.testing.assert_close(merged([perms[ANCHOR], perms[COPY]]), expected, rtol=1e-5, atol=1e-6)
    # without alignment the average mixes unrelated neurons
    assert not torch.allclose(merged(None), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_unrelated_experts_give_a_valid_permutation(family):
    _, layer = _layer(family)
    size, hidden = layer.intermediate_size, _hidden(layer, tokens=64)
    by_weight = align_to_anchor(layer, 0, [3, 4, 0])
    by_act = align_to_anchor(layer, 0, [3, 4], hidden=hidden, method="activation")
    assert set(by_weight) == set(by_act) == {0, 3, 4} and by_weight[0] is None is by_act[0]
    for perms in (by_weight, by_act):
        assert all(_is_perm(perms[m], size) for m in (3, 4))
    assert by_act[3] == activation_matching(layer, 0, 3, hidden)
    assert by_weight[4] == weight_matching(layer, 0, 4)


def test_dead_neurons_do_not_break_activation_matching():
    _, layer = _layer("mixtral")
    with torch.no_grad():  # kill the first 10 neurons of expert 2: zero gate and up rows
        size = layer.intermediate_size
        layer.param("gate_up_proj")[2, :10] = 0
        layer.param("gate_up_proj")[2, size : size + 10] = 0
    perm = activation_matching(layer, 2, 5, _hidden(layer, tokens=32))
    assert _is_perm(perm, size)
    assert _is_perm(activation_matching(layer, 5, 2, _hidden(layer, tokens=32)), size)


def test_activation_matching_needs_hidden_states():
    _, layer = _layer("mixtral")
    with pytest.raises(MoeShrinkError, match="hidden states"):
        align_to_anchor(layer, 0, [1], method="activation")
    with pytest.raises(MoeShrinkError, match="unknown alignment method"):
        align_to_anchor(layer, 0, [1], method="cosine")  # type: ignore[arg-type]
