"""Statistics equal a brute-force recomputation; methods keep what their scores say."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeshrink.arch import ADAPTERS, split_router_output
from moeshrink.engine.observers import STATISTICS, LayerObserver
from moeshrink.methods import LayerBudget, get_method, top_scores
from moeshrink.testbed.tiny import randomize_routers, tiny_config


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_observer_statistics_match_brute_force(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    randomize_routers(model, family)
    layer = ADAPTERS[family].moe_layers(model)[0]
    hidden = torch.randn(2, 10, layer.hidden_size)
    with torch.no_grad(), LayerObserver(layer, STATISTICS) as observer:
        layer.block(hidden)
    stats = observer.stats
    flat = hidden.reshape(-1, layer.hidden_size)
    with torch.no_grad():
        logits, weights, index = split_router_output(layer.router(flat))
    n = layer.num_experts
    counts = torch.zeros(n, dtype=torch.float64)
    co = torch.zeros(n, n, dtype=torch.float64)
    norm_sum = torch.zeros(n, dtype=torch.float64)
    gated = torch.zeros(n, dtype=torch.float64)
    for t in range(flat.shape[0]):
        for slot, e in enumerate(index[t].tolist()):
            counts[e] += 1
            out = layer.expert_outputs(flat[t : t + 1], torch.tensor([e])).norm().double()
            norm_sum[e] += out
            gated[e] += float(weights[t, slot]) * out
        for a in index[t].tolist():
            for b in index[t].tolist():
                co[a, b] += 1
    assert stats.num_tokens == 20
    torch.testing.assert_close(stats.counts, counts)
    torch.testing.assert_close(stats.coactivation, co)
    torch.testing.assert_close(stats.norm_sum, norm_sum, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.gated_norm_sum, gated, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        stats.soft_mass, layer.probabilities(logits).double().sum(0), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(stats.logits, logits.float())
    torch.testing.assert_close(stats.inputs, flat)
    all_outputs = torch.stack([layer.expert_outputs(flat, torch.full((20,), j)) for j in range(n)])
    torch.testing.assert_close(stats.mean_outputs(), all_outputs.double().mean(1), rtol=1e-4, atol=1e-6)


def test_top_scores_ties_and_groups():
    scores = torch.tensor([1.0, 5.0, 5.0, 0.0, 3.0, 2.0, 9.0, 1.0])
    assert top_scores(scores, 3) == [1, 2, 6]
    assert top_scores(scores, 4, groups=2) == [1, 2, 4, 6]


class _Stats:
    """Statistics for one layer of 4 experts, written by hand."""

    num_tokens = 100
    counts = torch.tensor([50.0, 6.0, 70.0, 74.0], dtype=torch.float64)
    soft_mass = torch.tensor([30.0, 20.0, 25.0, 25.0], dtype=torch.float64)
    norm_sum = torch.tensor([50.0, 60.0, 35.0, 74.0], dtype=torch.float64)
    gated_norm_sum = torch.tensor([25.0, 30.0, 14.0, 37.0], dtype=torch.float64)


class _Layer:
    index, num_experts = 0, 4


@pytest.mark.parametrize(
    "method, kept",
    [
        ("frequency", [2, 3]),  # most selected
        ("soft_activation", [0, 2]),  # largest mass; tie 2 vs 3 -> lower index
        ("ean", [1, 3]),  # largest sum of norms
        # mean gated norm over routed tokens 0.5, 5.0, 0.2, 0.5: expert 1, routed only 6 times, wins
        ("reap", [0, 1]),
    ],
)
def test_score_methods_keep_what_their_score_says(method, kept):
    plan = get_method(method).plan_layer(_Layer(), _Stats(), LayerBudget(keep=2, top_k=2))
    assert plan.kept == kept and plan.num_experts_after == 2
    if method == "reap":
        assert plan.scores == pytest.approx([0.5, 5.0, 0.2, 0.5])


def test_random_is_seeded():
    a = get_method("random", seed=1).plan_layer(_Layer(), None, LayerBudget(2, 2))
    b = get_method("random", seed=1).plan_layer(_Layer(), None, LayerBudget(2, 2))
    c = [get_method("random", seed=s).plan_layer(_Layer(), None, LayerBudget(2, 2)).kept for s in range(8)]
    assert a.kept == b.kept and len({tuple(k) for k in c}) > 1
