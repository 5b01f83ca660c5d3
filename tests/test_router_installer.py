"""The one router installer (moeshrink.surgery.router): install a routing rule on real tiny models of
every family, and put the router back exactly (forward, top-k, expert counts, the tensor objects)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeshrink.arch import ADAPTERS, split_router_output
from moeshrink.search.fitness import expert_rows
from moeshrink.surgery import RouterState, apply_layer_plan, install_router, installed_router

from .conftest import FAMILIES


def _load(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    return model, ADAPTERS[model.config.model_type]


def _snapshot(layer) -> dict:
    """Everything the installer may touch, by value and by object identity."""
    modules = {"block": layer.block, "router": layer.router, "experts": layer.experts}
    return {
        "attrs": {
            (where, name): getattr(module, name)
            for where, module in modules.items()
            for name in ("top_k", "num_experts", "out_features")
            if hasattr(module, name)
        },
        "instance_forward": layer.router.__dict__.get("forward"),
        "tensors": {
            name: (id(t), t.clone(), name in layer.router._buffers)
            for name, t in layer.router_tensors().items()
        },
        "parameters": sorted(name for name, _ in layer.router.named_parameters()),
        "buffers": sorted(name for name, _ in layer.router.named_buffers()),
    }


def _assert_same(before: dict, after: dict) -> None:
    assert after["attrs"] == before["attrs"]
    assert after["instance_forward"] is before["instance_forward"]
    assert after["parameters"] == before["parameters"] and after["buffers"] == before["buffers"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (ident, value, buffer) in before["tensors"].items():
        a_ident, a_value, a_buffer = after["tensors"][name]
        assert a_ident == ident and a_buffer == buffer and torch.equal(a_value, value)


def _own_route(layer):
    """The family's own routing of the original logits: installing it must change nothing."""

    def route(logits):
        weights, index = layer.route(logits)
        return logits, weights, index

    return route


@pytest.mark.parametrize("family", FAMILIES)
def test_install_then_restore_is_exact(family, checkpoints):
    model, adapter = _load(checkpoints[family])
    layers = adapter.moe_layers(model)
    ids = torch.arange(3, 3 + 2 * 10).reshape(2, 10) % model.config.vocab_size
    before = [_snapshot(layer) for layer in layers]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        states = [install_router(layer, _own_route(layer)) for layer in layers]
        assert all("forward" in layer.router.__dict__ for layer in layers)
        assert torch.equal(model(input_ids=ids).logits, reference)  # the family's own rule: same output
        for state in states:
            state.restore()
        _assert_same(before[0], _snapshot(layers[0]))
        assert [_snapshot(layer)["attrs"] for layer in layers] == [b["attrs"] for b in before]
        assert torch.equal(model(input_ids=ids).logits, reference)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])  # top-k can change
def test_top_k_and_masked_route_then_restore(family, checkpoints):
    model, adapter = _load(checkpoints[family])
    layer = adapter.moe_layers(model)[0]
    before = _snapshot(layer)
    allowed = torch.zeros(layer.num_experts, dtype=torch.bool)
    allowed[[0, 1, 4, 5]] = True  # two per group: DeepSeek's grouped routing still has a choice
    seen = []

    def route(logits):
        seen.append(logits.shape[-1])
        weights, index = layer.route(logits, allowed)
        return logits, weights, index

    ids = torch.arange(5, 25).reshape(2, 10) % model.config.vocab_size
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with installed_router(layer, route, top_k=1) as state:
            assert isinstance(state, RouterState)
            assert layer.top_k == 1 and all(
                m.top_k == 1 for m in (layer.block, layer.router) if hasattr(m, "top_k")
            )
            _, weights, index = split_router_output(layer.router(torch.randn(7, layer.hidden_size)))
            assert index.shape == (7, 1) and bool(allowed[index].all())
            model(input_ids=ids)
        assert seen and set(seen) == {layer.num_experts}  # the route saw all E original logits
        _assert_same(before, _snapshot(layer))
        assert torch.equal(model(input_ids=ids).logits, reference)


def test_restored_after_an_error_and_nested_installs_unwind(checkpoints):
    model, adapter = _load(checkpoints["mixtral"])
    layer = adapter.moe_layers(model)[0]
    before = _snapshot(layer)
    with pytest.raises(RuntimeError, match="inside"), installed_router(layer, _own_route(layer), top_k=1):
        raise RuntimeError("inside")
    _assert_same(before, _snapshot(layer))

    outer = install_router(layer, _own_route(layer), top_k=1)
    installed = layer.router.__dict__["forward"]
    with installed_router(layer, _own_route(layer), top_k=2):
        assert layer.router.__dict__["forward"] is not installed
        layer.router(torch.randn(3, layer.hidden_size))  # the inner rule calls the outer one: no error
    assert layer.router.__dict__["forward"] is installed and layer.top_k == 1
    outer.restore()
    _assert_same(before, _snapshot(layer))


def test_source_and_source_top_k(checkpoints):
    """Logits from a separate module (its own rows), at a top-k put back after each call."""
    model, adapter = _load(checkpoints["qwen3_moe"])
    layer = adapter.moe_layers(model)[0]
    before = _snapshot(layer)
    source = copy.deepcopy(layer.router)
    with torch.no_grad():
        source.weight.mul_(-1.0)
    hidden = torch.randn(6, layer.hidden_size)
    expected = source(hidden)[0]
    ks = []

    def route(logits):
        ks.append(source.top_k)
        weights, index = layer.route(logits)
        return logits, weights, index

    with torch.no_grad(), installed_router(layer, route, source=source, source_top_k=layer.num_experts):
        logits, _, _ = split_router_output(layer.router(hidden))
        assert torch.equal(logits, expected)
        assert ks == [layer.top_k] and source.top_k == layer.top_k  # put back before routing
    _assert_same(before, _snapshot(layer))


@pytest.mark.parametrize("family", ["mixtral", "phimoe", "gpt_oss"])
def test_restore_rows_after_surgery_then_full_restore(family, checkpoints):
    """The EEP working copy's order: surgery to K experts, the router's own E rows back, install, restore."""
    model, adapter = _load(checkpoints[family])
    layer = adapter.moe_layers(model)[0]
    before = _snapshot(layer)
    num_experts = layer.num_experts
    state = RouterState.save(layer)
    merge = torch.eye(num_experts)[[0, 2, 5, 7]]
    apply_layer_plan(layer, expert_rows(layer.index, merge))
    assert layer.num_experts == 4 and layer.experts.num_experts == 4
    state.restore_rows()
    assert layer.num_experts == num_experts and layer.router.num_experts == num_experts
    assert layer.experts.num_experts == 4  # only the router's own rows and count came back
    _assert_same({**before, "attrs": {}}, {**_snapshot(layer), "attrs": {}})

    def route(logits):
        kept = logits[:, [0, 2, 5, 7]]
        weights, index = layer.route(kept)
        return kept, weights, index

    install_router(layer, route, top_k=2, source_top_k=state.top_k[layer.router])
    with torch.no_grad():
        logits, _, index = split_router_output(layer.router(torch.randn(4, layer.hidden_size)))
    assert logits.shape == (4, 4) and int(index.max()) < 4
    state.restore()
    _assert_same(before, _snapshot(layer))
