"""NAEE's batched subset search chooses exactly what the reference search (the dense-routing
computation it replaced, kept here as it was) chooses, on real tiny layers of several families."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import moeshrink
from moeshrink.engine.data import build_calibration
from moeshrink.engine.observers import INPUTS, LOGITS, LayerObserver
from moeshrink.io.checkpoint import load_model, load_tokenizer
from moeshrink.methods import LayerBudget
from moeshrink.methods.naee import NAEEPruning, ReconstructionError, SubsetErrors, _masks, expert_grams
from moeshrink.surgery import set_top_k


@torch.no_grad()
def reference_search(
    layer, stats, budget, max_subsets=20000, max_tokens=2048
) -> tuple[list[int], float, str]:
    """The search as it was before the batched scoring: every candidate scored by the dense routing
    weights, chunk by chunk; the first least error wins (exhaustive), greedy elimination beyond."""
    set_top_k(layer, budget.top_k)
    hidden = stats.inputs[:max_tokens].to(layer.router.weight.dtype)
    error = ReconstructionError(layer, stats.logits[:max_tokens], expert_grams(layer, hidden))
    e, groups = layer.num_experts, budget.groups
    size, per_group = e // groups, budget.keep // groups
    if math.comb(size, per_group) ** groups <= max_subsets:
        per = [
            list(itertools.combinations(range(g * size, (g + 1) * size), per_group)) for g in range(groups)
        ]
        subsets = (sum(parts, ()) for parts in itertools.product(*per))
        best, best_subset = math.inf, None
        while chunk := list(itertools.islice(subsets, error.batch)):
            errors = error(_masks(chunk, e))
            i = int(errors.argmin())
            if float(errors[i]) < best:
                best, best_subset = float(errors[i]), chunk[i]
        return sorted(best_subset), best, "exhaustive"
    kept, best = set(range(e)), 0.0
    while len(kept) > per_group * groups:
        removable = [j for j in sorted(kept) if sum(1 for i in kept if i // size == j // size) > per_group]
        candidates = [tuple(sorted(kept - {j})) for j in removable]
        errors = error(_masks(candidates, e))
        i = int(errors.argmin())
        kept.remove(removable[i])
        best = float(errors[i])
    return sorted(kept), best, "greedy"


def layer_stats(model, adapter, path, calib_file):
    """Inputs and router logits of every MoE layer on real calibration text."""
    ids = build_calibration(load_tokenizer(path), [calib_file], 8, 64, 0).input_ids
    layers = adapter.moe_layers(model)
    observers = [LayerObserver(layer, {INPUTS, LOGITS}) for layer in layers]
    for o in observers:
        o.__enter__()
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for o in observers:
            o.__exit__(None, None, None)
    return [(layer, o.stats) for layer, o in zip(layers, observers, strict=True)]


def kept(plan) -> list[int]:
    return [e.sources[0] for e in plan.experts]


# (family, routing groups, top-k after pruning, keeps, dtype): the rank tables (top-1, top-2), the rank
# path with k > 2 and with softmax over the kept set (OLMoE, no renormalisation), the routed path
# (DeepSeek's groups, PhiMoE's sparsemixer); in bfloat16, routers whose logits tie (as the testbed's do).
CASES = [
    ("mixtral", 1, 2, [2, 3, 4, 5, 6, 7], "float32"),
    ("mixtral", 1, 1, [1, 3, 5], "float32"),
    ("mixtral", 1, 3, [3, 4, 6], "float32"),
    ("qwen3_moe", 1, 2, [2, 4, 6], "float32"),
    ("olmoe", 1, 2, [2, 4, 6], "float32"),
    ("deepseek_v3", 2, 2, [2, 4, 6], "float32"),
    ("phimoe", 1, 2, [3, 5], "float32"),
    ("mixtral", 1, 2, [2, 4, 6], "bfloat16"),
    ("qwen3_moe", 1, 3, [3, 5], "bfloat16"),
    ("olmoe", 1, 2, [3, 5], "bfloat16"),
    ("deepseek_v3", 2, 2, [4], "bfloat16"),
]


@pytest.mark.parametrize(("family", "groups", "top_k", "keeps", "dtype"), CASES)
def test_naee_chooses_what_the_reference_search_chooses(
    family, groups, top_k, keeps, dtype, checkpoints, calib_file
):
    loaded = load_model(checkpoints[family], dtype)
    for layer, stats in layer_stats(loaded.model, loaded.adapter, checkpoints[family], calib_file):
        for keep in keeps:
            budget = LayerBudget(keep=keep, top_k=top_k, groups=groups)
            for max_subsets in (20000, 1):  # exhaustive, then the greedy fallback
                want, want_error, search = reference_search(layer, stats, budget, max_subsets)
                plan = NAEEPruning(max_subsets=max_subsets).plan_layer(layer, stats, budget)
                assert (kept(plan), plan.details["search"]) == (want, search), (
                    layer.index,
                    keep,
                    max_subsets,
                )
                assert plan.details["error"] == pytest.approx(want_error, rel=1e-9, abs=1e-12)


def test_subset_errors_match_the_reference_for_every_subset(checkpoints, calib_file):
    """Not only the least: every subset's error, on the rank tables, the routed path, and both (ties)."""
    for family, dtype in (("mixtral", "float32"), ("mixtral", "bfloat16"), ("deepseek_v3", "float32")):
        loaded = load_model(checkpoints[family], dtype)
        layer, stats = layer_stats(loaded.model, loaded.adapter, checkpoints[family], calib_file)[-1]
        masks = _masks(list(itertools.combinations(range(layer.num_experts), 4)), layer.num_experts)
        with torch.no_grad():
            error = SubsetErrors(layer, stats.inputs.to(layer.router.weight.dtype), stats.logits)
            fast, exact = error(masks), error.reference(masks)
        assert error.evaluated == len(masks)
        assert torch.allclose(fast, exact, rtol=1e-5, atol=1e-9 * error.energy)
        # the bound the choice relies on holds for every subset
        assert float((fast - exact).abs().max()) <= error.tolerance(float(fast.min())) / 2
        if dtype == "bfloat16":  # tied logits: those tokens are routed by the family's rule
            assert 0 < len(error.routed) < stats.inputs.shape[0]
        if family == "mixtral":  # rank tuples from the bits themselves, as for more than 16 experts
            error.lookup = None
            with torch.no_grad():
                assert torch.equal(error(masks), fast)


def test_naee_breaks_exact_ties_as_the_reference(checkpoints, calib_file):
    """Expert 5 a copy of expert 2 (router row and weights): subsets that swap one for the other
    reconstruct equally well, and the search keeps the one the reference keeps."""
    loaded = load_model(checkpoints["mixtral"], "float32")
    model, adapter = loaded.model, loaded.adapter
    with torch.no_grad():
        for layer in adapter.moe_layers(model):
            layer.router.weight[5] = layer.router.weight[2]
            for spec in layer.expert_tensors:
                layer.param(spec.name)[5] = layer.param(spec.name)[2]
    for layer, stats in layer_stats(model, adapter, checkpoints["mixtral"], calib_file):
        for keep in (2, 3, 4, 6):
            budget = LayerBudget(keep=keep, top_k=2)
            want, _, _ = reference_search(layer, stats, budget)
            assert kept(NAEEPruning().plan_layer(layer, stats, budget)) == want


def test_pruned_checkpoint_keeps_the_reference_subsets(checkpoints, calib_file, tmp_path, monkeypatch):
    """Through ``moeshrink.prune`` (each layer's statistics after the layers before it were pruned):
    the plan keeps, in every layer, the subset the reference search picks on the same statistics;
    the export carries those experts' weights and greedy never beats the exhaustive optimum."""
    plan_layer, chosen = NAEEPruning.plan_layer, {}

    def with_reference(self, layer, stats, budget):
        chosen[layer.index] = reference_search(layer, stats, budget)
        greedy = plan_layer(self.with_options(max_subsets=1), layer, stats, budget)
        plan = plan_layer(self, layer, stats, budget)
        assert greedy.details["error"] >= plan.details["error"] * (1 - 1e-9)
        assert greedy.details["subsets_evaluated"] < plan.details["subsets_evaluated"]
        return plan

    monkeypatch.setattr(NAEEPruning, "plan_layer", with_reference)
    out = tmp_path / "out"
    result = moeshrink.prune(
        checkpoints["mixtral"],
        "naee",
        keep=4,
        calib=calib_file,
        output=out,
        samples=8,
        seq_len=32,
        progress=False,
    )
    assert {lp.layer: kept(lp) for lp in result.plan.layers} == {i: c[0] for i, c in chosen.items()}
    original = load_model(checkpoints["mixtral"], "float32")
    pruned = load_model(out, "float32")
    for before, after, lp in zip(
        original.adapter.moe_layers(original.model),
        pruned.adapter.moe_layers(pruned.model),
        result.plan.layers,
        strict=True,
    ):
        assert torch.equal(after.router.weight, before.router.weight[kept(lp)])
        for spec in before.expert_tensors:
            assert torch.equal(after.param(spec.name), before.param(spec.name)[kept(lp)])
