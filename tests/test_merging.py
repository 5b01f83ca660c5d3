"""Merging methods: clusters are real partitions, the algorithms find planted structure, and merged
checkpoints reload in a fresh process with the in-memory logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import moeshrink
from moeshrink.arch import split_router_output
from moeshrink.engine.observers import LayerStats
from moeshrink.methods import LayerBudget, get_method
from moeshrink.methods.clustering import kmeans, spectral_clusters
from moeshrink.methods.merging import logit_space_coefficients


class _Layer:
    index, num_experts = 0, 6

    @staticmethod
    def route(logits, allowed=None):
        w, i = torch.softmax(logits.float(), -1).topk(2, dim=-1)
        return w / w.sum(-1, keepdim=True), i

    probabilities = staticmethod(lambda x: torch.softmax(x.float(), -1))


def _planted_stats() -> LayerStats:
    """6 experts in 3 planted pairs {0,3}, {1,4}, {2,5}: near-identical logit profiles and mean outputs."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 3, generator=g) * 3
    logits = torch.cat([base, base + 0.05 * torch.randn(400, 3, generator=g)], dim=1)
    centres = torch.randn(3, 16, generator=g) * 5
    outputs = torch.cat([centres, centres + 0.01 * torch.randn(3, 16, generator=g)])
    return LayerStats(
        num_experts=6,
        num_tokens=400,
        counts=torch.tensor([90.0, 10.0, 50.0, 30.0, 70.0, 20.0], dtype=torch.float64),
        logits=logits,
        output_sum=outputs.double() * 400,
    )


@pytest.mark.parametrize("method", ["msmoe", "hcsmoe", "uncurl"])
def test_merge_methods_recover_planted_pairs(method, monkeypatch):
    m = get_method(method, align="none")
    clusters = m.clusters(_Layer(), _planted_stats(), LayerBudget(keep=3, top_k=2))
    assert sorted(sorted(c) for c in clusters) == [[0, 3], [1, 4], [2, 5]]


def test_merge_plan_uses_frequency_weights_and_the_most_used_anchor():
    m = get_method("hcsmoe", router="average")
    stats = _planted_stats()
    expert = m.merge(_Layer(), stats, [1, 4])
    assert expert.sources == [4, 1] and expert.weights == pytest.approx([0.875, 0.125])
    assert expert.router_weights == pytest.approx([0.875, 0.125])
    assert get_method("hcsmoe", router="anchor").merge(_Layer(), stats, [1, 4]).router_weights == [1.0, 0.0]


def test_logsumexp_router_tracks_the_cluster_mass_better_than_averaging():
    stats = _planted_stats()
    members = [0, 1]
    coefficients = torch.tensor(
        logit_space_coefficients(_Layer(), stats.logits, members), dtype=torch.float64
    )
    routed = torch.isin(_Layer.route(stats.logits)[1], torch.tensor(members)).any(
        1
    )  # the tokens it is fitted on
    logits = stats.logits.double()[routed]
    target = torch.logsumexp(logits[:, members], 1)
    fitted = logits[:, members] @ coefficients
    averaged = logits[:, members].mean(1)
    assert ((fitted - target) ** 2).mean() < ((averaged - target) ** 2).mean()


def test_kmeans_and_spectral_give_exactly_k_nonempty_clusters():
    points = np.random.default_rng(0).normal(size=(10, 3))
    for k in (1, 3, 10):
        assert sorted(set(kmeans(points, k).tolist())) == list(range(k))
    affinity = np.ones((6, 6))
    labels = spectral_clusters(affinity, 3)
    assert len(set(labels.tolist())) == 3


def test_bad_merge_options():
    with pytest.raises(moeshrink.MoeShrinkError, match="align must be one of"):
        get_method("uncurl", align="sideways")
    with pytest.raises(moeshrink.MoeShrinkError, match="router must be one of"):
        get_method("msmoe", router="nope")


RELOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""


@pytest.mark.parametrize(
    "family, method, options",
    [
        ("mixtral", "uncurl", {"align": "activation", "router": "logsumexp"}),
        ("qwen2_moe", "msmoe", {"router": "average", "reconstruct": False}),
        ("olmoe", "hcsmoe", {}),
        ("deepseek_v3", "hcsmoe", {"router": "logsumexp"}),
        ("gpt_oss", "uncurl", {"reconstruct": True}),
        ("qwen3_moe", "msmoe", {"reconstruct": True, "router": "logsumexp"}),
    ],
)
def test_merged_checkpoint_reloads_with_the_in_memory_logits(
    family, method, options, checkpoints, calib_file, tmp_path
):
    result = moeshrink.prune(
        checkpoints[family],
        method,
        keep=4,
        calib=calib_file,
        output=tmp_path / "out",
        samples=8,
        seq_len=32,
        method_options=options,
        progress=False,
    )
    assert any(len(e.sources) > 1 for lp in result.plan.layers for e in lp.experts)
    ids = torch.randint(1, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = result.model(ids).logits
    subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD,
            str(tmp_path / "out"),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "l.pt"),
        ],
        check=True,
    )
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), expected, rtol=1e-4, atol=1e-4)
    plan = json.loads((tmp_path / "out" / "moeshrink_plan.json").read_text())
    assert plan["method_options"]["align"] == (
        options.get("align") or ("none" if method == "hcsmoe" else "weight")
    )


@torch.no_grad()
def _moe_layer_errors(original, compressed, adapter, input_ids: torch.Tensor) -> list[float]:
    """Per MoE layer, the mean squared difference between the compressed and the original MoE block's
    outputs on the same inputs: those that reach the block in the original model on ``input_ids``."""
    blocks = [layer.block for layer in adapter.moe_layers(original)]
    inputs: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone())) for b in blocks]
    try:
        original(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()

    def out(block, x):
        y = block(x)
        return (y[0] if isinstance(y, tuple) else y).float()

    pairs = zip(blocks, (layer.block for layer in adapter.moe_layers(compressed)), inputs, strict=True)
    return [float((out(new, x) - out(old, x)).pow(2).mean()) for old, new, x in pairs]


def test_reconstruction_lowers_the_layer_error_and_the_plan_reapplies(checkpoints, calib_file, tmp_path):
    """The re-fit down projection brings every MoE layer's output closer to the original's than the
    plain merge does (measured on the calibration tokens it was fitted on, each layer fed the original
    model's inputs), and ``apply`` reproduces the checkpoint from plan + refit file."""
    from safetensors.torch import load_file

    from moeshrink.engine.data import build_calibration
    from moeshrink.io.checkpoint import load_model
    from moeshrink.plan import LEGACY_REFIT_FILENAME, REFIT_FILENAME

    kwargs = dict(keep=4, calib=calib_file, samples=8, seq_len=32, progress=False)
    plain = moeshrink.prune(checkpoints["mixtral"], "uncurl", method_options={"reconstruct": False}, **kwargs)
    refit = moeshrink.prune(
        checkpoints["mixtral"],
        "uncurl",
        output=tmp_path / "out",
        method_options={"reconstruct": True},
        **kwargs,
    )
    original = load_model(checkpoints["mixtral"])
    ids = build_calibration(original.tokenizer, [calib_file], 8, 32).input_ids
    before = _moe_layer_errors(original.model, plain.model, original.adapter, ids)
    after = _moe_layer_errors(original.model, refit.model, original.adapter, ids)
    refit_layers = {lp.layer for lp in refit.plan.layers if any(e.refit for e in lp.experts)}
    assert refit_layers
    for i, layer in enumerate(original.adapter.moe_layers(original.model)):
        if layer.index in refit_layers:
            assert after[i] < before[i], (i, before, after)
        else:
            assert after[i] == pytest.approx(before[i])
    assert (tmp_path / "out" / REFIT_FILENAME).is_file()
    assert [f.name for f in (tmp_path / "out").glob("*.safetensors")] == ["model.safetensors"]
    changed = [e for lp in refit.plan.layers for e in lp.experts if e.refit]
    assert changed and all(e.refit == ["down_proj"] for e in changed)
    assert [lp.kept for lp in plain.plan.layers] == [lp.kept for lp in refit.plan.layers]
    moeshrink.apply_plan(checkpoints["mixtral"], tmp_path / "out" / "moeshrink_plan.json", tmp_path / "again")
    first, second = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(tmp_path / "again" / "model.safetensors"),
    )
    assert all(torch.equal(first[k], second[k]) for k in first)
    # an output in the layout before 0.2 (refit file at the top level) still applies
    legacy = tmp_path / "legacy"
    shutil.copytree(tmp_path / "out", legacy)
    (legacy / REFIT_FILENAME).rename(legacy / LEGACY_REFIT_FILENAME)
    moeshrink.apply_plan(checkpoints["mixtral"], legacy / "moeshrink_plan.json", tmp_path / "third")
    third = load_file(tmp_path / "third" / "model.safetensors")
    assert all(torch.equal(first[k], third[k]) for k in first)


def test_refit_solves_the_weighted_least_squares_problem():
    """On a layer whose cluster target is known, the re-fit down projection is the ridge solution."""
    from transformers import AutoModelForCausalLM

    from moeshrink.arch import ADAPTERS
    from moeshrink.plan import LayerPlan, NewExpert
    from moeshrink.surgery import apply_layer_plan
    from moeshrink.surgery.reconstruct import cluster_targets, refit_down_projection
    from moeshrink.testbed.tiny import randomize_routers, tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral")).eval()
    randomize_routers(model, "mixtral")
    layer = ADAPTERS["mixtral"].moe_layers(model)[0]
    x = torch.randn(300, layer.hidden_size)
    with torch.no_grad():
        logits = split_router_output(layer.router(x))[0]
    experts = [NewExpert(sources=[0, 1], weights=[0.5, 0.5], router_weights=[0.5, 0.5])]
    experts += [NewExpert.keep(j) for j in range(2, 8)]
    plan = LayerPlan(layer=layer.index, num_experts_before=8, experts=experts)
    targets = cluster_targets(layer, plan, x, logits)
    apply_layer_plan(layer, plan)
    t = targets[0]
    before = (
        layer.expert_outputs(x[t.tokens], torch.zeros(len(t.tokens), dtype=torch.long)).double() - t.target
    )
    refit_down_projection(layer, 0, x, t, ridge=1e-6)
    after = (
        layer.expert_outputs(x[t.tokens], torch.zeros(len(t.tokens), dtype=torch.long)).double() - t.target
    )
    weighted = lambda r: float((t.weight[:, None] * r**2).sum())  # noqa: E731
    assert weighted(after) < 0.9 * weighted(before)


def test_refit_ignores_tokens_whose_cluster_gate_underflowed_to_zero():
    """Router logits far apart (as in random synthetic checkpoints) make a second-slot gate exactly 0:
    those tokens carry no weight and must not turn the target (y / G = 0 / 0) and the refit into NaN."""
    from transformers import AutoModelForCausalLM

    from moeshrink.arch import ADAPTERS
    from moeshrink.plan import LayerPlan, NewExpert
    from moeshrink.surgery import apply_layer_plan
    from moeshrink.surgery.reconstruct import cluster_targets, refit_down_projection
    from moeshrink.testbed.tiny import randomize_routers, tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral")).eval()
    randomize_routers(model, "mixtral")
    layer = ADAPTERS["mixtral"].moe_layers(model)[0]
    x = torch.randn(300, layer.hidden_size)
    with torch.no_grad():
        logits = split_router_output(layer.router(x))[0] * 1e4  # gaps of hundreds: exp underflows
        weights, index = layer.route(logits)
    token = int((weights[:, 1] == 0).nonzero()[0])  # its second expert's gate is exactly 0
    first, second = int(index[token, 0]), int(index[token, 1])
    cluster = sorted([second, next(j for j in range(8) if j not in (first, second))])
    experts = [NewExpert(sources=cluster, weights=[0.5, 0.5], router_weights=[1.0, 0.0])]
    experts += [NewExpert.keep(j) for j in range(8) if j not in cluster]
    plan = LayerPlan(layer=layer.index, num_experts_before=8, experts=experts)
    target = cluster_targets(layer, plan, x, logits)[0]
    assert torch.isfinite(target.target).all() and (target.weight > 0).all()
    members = torch.isin(index, torch.tensor(cluster))
    gated = (members & (weights > 0)).any(dim=1)  # routed to a member with a gate above 0
    assert sorted(target.tokens.tolist()) == gated.nonzero().squeeze(1).tolist()
    assert (members.any(dim=1) & ~gated).any()  # and some tokens were left out for a zero gate
    apply_layer_plan(layer, plan)
    refit = refit_down_projection(layer, 0, x, target)
    assert torch.isfinite(refit["down_proj"]).all()


def test_capped_average_linkage_matches_scipy_without_a_binding_cap_and_respects_the_cap():
    from scipy.cluster.hierarchy import cut_tree, linkage

    from moeshrink.methods.clustering import capped_average_linkage, labels_to_clusters

    points = np.random.default_rng(3).normal(size=(12, 5))
    ours = capped_average_linkage(points, 4, cap=12)
    theirs = cut_tree(linkage(points, method="average"), n_clusters=4).reshape(-1)
    members = list(range(12))
    assert sorted(labels_to_clusters(members, ours)) == sorted(labels_to_clusters(members, theirs))
    capped = labels_to_clusters(members, capped_average_linkage(points, 4, cap=3))
    assert len(capped) == 4 and max(len(c) for c in capped) <= 3
    with pytest.raises(ValueError, match="cannot form"):
        capped_average_linkage(points, 3, cap=3)


def test_hcsmoe_cluster_cap():
    stats = _planted_stats()
    clusters = get_method("hcsmoe", max_cluster_size=2).clusters(
        _Layer(), stats, LayerBudget(keep=3, top_k=2)
    )
    assert max(len(c) for c in clusters) <= 2
    with pytest.raises(moeshrink.MoeShrinkError, match="raise max_cluster_size"):
        get_method("hcsmoe", max_cluster_size=1).clusters(_Layer(), stats, LayerBudget(keep=3, top_k=2))
