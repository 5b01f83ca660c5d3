"""STUN (phase 1 clustering, phase 2 total sparsity), NAEE subset search, OWL and sparsity scopes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import moeshrink
from moeshrink.arch import ADAPTERS
from moeshrink.engine.observers import INPUTS, LOGITS, LayerObserver
from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import load_model
from moeshrink.methods import LayerBudget, get_method
from moeshrink.methods.naee import NAEEPruning
from moeshrink.methods.stun import complete_linkage, cut_after, expert_distances
from moeshrink.sparsity import linear_view
from moeshrink.sparsity.layer import expert_weight_names, scoped_linears
from moeshrink.sparsity.masks import OWL_LAMBDA
from moeshrink.surgery.simulate import restricted_routing

KW = dict(samples=8, seq_len=32, progress=False)


def _zeros_and_total(tensors) -> tuple[int, int]:
    return sum(int((t == 0).sum()) for t in tensors), sum(t.numel() for t in tensors)


# --- STUN phase 1 ---------------------------------------------------------------------------------


def test_cut_after_is_the_complete_linkage_threshold_cut():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(12, 3))
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    merges = complete_linkage(d)
    for k in range(1, 13):
        clusters = cut_after(merges, 12, k)
        assert len(clusters) == k and sorted(j for c in clusters for j in c) == list(range(12))
        threshold = merges[12 - k - 1, 2] if k < 12 else 0.0
        # complete linkage: every pair inside a cluster is within the threshold...
        assert all(d[i, j] <= threshold + 1e-12 for c in clusters for i in c for j in c)
        # ...and no two clusters could be joined under the next merge's height
        if k > 1:
            nxt = merges[12 - k, 2]
            for a, b in itertools.combinations(clusters, 2):
                assert max(d[i, j] for i in a for j in b) >= nxt - 1e-12


def test_stun_groups_experts_with_the_same_router_row(checkpoints, calib_file, tmp_path):
    """Make expert 5 a copy of expert 2 (router row included): STUN removes exactly one of the twins,
    and the survivor's router row takes the pair's routing mass."""
    loaded = load_model(checkpoints["mixtral"])
    model, adapter = loaded.model, loaded.adapter
    with torch.no_grad():
        for layer in adapter.moe_layers(model):
            layer.router.weight[5] = layer.router.weight[2]
            for spec in layer.expert_tensors:
                layer.param(spec.name)[5] = layer.param(spec.name)[2]
    model.save_pretrained(tmp_path / "twins")
    loaded.tokenizer.save_pretrained(tmp_path / "twins")
    result = moeshrink.prune(
        tmp_path / "twins",
        "stun",
        keep=7,
        calib=calib_file,
        method_options={"coactivation": 0.0, "mode": "representative"},
        **KW,
    )
    for lp in result.plan.layers:
        merged = [e for e in lp.experts if len(e.sources) > 1]
        assert len(merged) == 1 and sorted(merged[0].sources) == [2, 5]
        assert merged[0].weights == [1.0, 0.0]  # the representative alone, no averaging


def test_stun_distance_uses_coactivation(checkpoints, calib_file):
    loaded = load_model(checkpoints["olmoe"])
    layer = loaded.adapter.moe_layers(loaded.model)[0]
    ids = torch.randint(0, 100, (4, 16))
    with LayerObserver(layer, {"coactivation"}) as observer:
        loaded.model(ids)
    plain = expert_distances(layer, observer.stats, 0.0)
    with_co = expert_distances(layer, observer.stats, 1.0)
    assert (np.diag(plain) == 0).all() and (plain >= 0).all() and (with_co >= 0).all()
    assert np.allclose(plain, plain.T) and not np.allclose(plain, with_co)


@pytest.mark.parametrize("family", ["qwen3_moe", "granitemoe"])
def test_stun_global_budget_meets_the_total_and_reloads_exactly(family, checkpoints, calib_file, tmp_path):
    layers = len(ADAPTERS[family].moe_layers(load_model(checkpoints[family]).model))
    result = moeshrink.prune(
        checkpoints[family], "stun", keep=4, global_budget=True, calib=calib_file, output=tmp_path / "o", **KW
    )
    counts = {lp.layer: len(lp.experts) for lp in result.plan.layers}
    assert sum(counts.values()) == 4 * layers and min(counts.values()) >= 2
    assert result.plan.method_options["threshold"] is not None
    reloaded = load_model(tmp_path / "o").model
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=1e-5, atol=1e-5)


def _twin_checkpoint(checkpoints, path, permute: bool):
    """Expert 5 of every layer made a copy of expert 2, router row included (with ``permute``, its
    intermediate neurons shuffled: the same function, weights that average badly without alignment)."""
    loaded = load_model(checkpoints["mixtral"])
    model, adapter = loaded.model, loaded.adapter
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter.moe_layers(model):
            layer.router.weight[5] = layer.router.weight[2]
            perm = torch.randperm(layer.intermediate_size, generator=generator)
            for spec in layer.expert_tensors:
                t = layer.param(spec.name)
                index = spec.neuron_index(perm) if permute else None
                t[5] = t[2] if index is None else t[2].index_select(spec.neuron_dim, index)
    model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path, len(adapter.moe_layers(model)), int(model.config.num_local_experts)


def _selective(path, experts, calib_file, **options):
    return moeshrink.prune(
        path,
        "stun",
        keep=experts - 1,
        calib=calib_file,
        method_options={"coactivation": 0.0, "selective": True} | options,
        **KW,
    )


def test_stun_selective_reconstructs_identical_experts_harmlessly(checkpoints, calib_file, tmp_path):
    """Twins: the merged expert is the twin itself, so reconstructing costs nothing against keeping it;
    the criterion says so, and the model equals plain STUN's (every cluster reconstructed)."""
    path, layers, experts = _twin_checkpoint(checkpoints, tmp_path / "twins", permute=False)
    result = _selective(path, experts, calib_file)
    plain = moeshrink.prune(
        path,
        "stun",
        keep=experts - 1,
        calib=calib_file,
        method_options={"coactivation": 0.0, "selective": False},
        **KW,
    )
    assert result.plan.method_options["selective"] is True and "selective" not in plain.plan.method_options
    for lp in result.plan.layers:
        (record,) = lp.details["selective"]
        assert record["sources"] == [2, 5] and record["closest"] in (2, 5)
        keep, rebuild = record["keep"]["error"], record["reconstruct"]["error"]
        assert keep > 0  # the twin's tokens now share their gate with another expert (the boundary)
        assert abs(keep - rebuild) <= 1e-3 * keep
        assert record["keep"]["reconstruction"] < 1e-6  # the kept twin is the cluster's own function
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(result.model(ids).logits, plain.model(ids).logits, rtol=1e-4, atol=1e-4)
    assert layers == len(result.plan.layers)


def test_stun_selective_keeps_the_closest_expert_when_the_merge_cannot_reproduce_it(
    checkpoints, calib_file, tmp_path
):
    """The twin with shuffled neurons, merged without alignment: the average mixes unrelated neurons,
    which no refit of the down projection repairs, so each layer keeps one twin as it is."""
    path, _, experts = _twin_checkpoint(checkpoints, tmp_path / "shuffled", permute=True)
    result = _selective(path, experts, calib_file, align="none")
    original = load_model(path)
    for lp, layer in zip(result.plan.layers, original.adapter.moe_layers(original.model), strict=True):
        (record,) = lp.details["selective"]
        assert record["choice"] == "keep" and record["keep"]["error"] < record["reconstruct"]["error"]
        assert record["keep"]["reconstruction"] < 1e-6 < record["reconstruct"]["reconstruction"]
        (kept,) = [e for e in lp.experts if len(e.sources) > 1]
        assert kept.sources[0] == record["closest"] and sorted(kept.sources) == [2, 5]
        assert kept.weights == [1.0, 0.0] and kept.refit == []
        new = original.adapter.moe_layers(result.model)[lp.layer]
        position = lp.experts.index(kept)
        for spec in layer.expert_tensors:
            torch.testing.assert_close(
                new.param(spec.name)[position], layer.param(spec.name)[kept.sources[0]]
            )


def test_stun_selective_under_a_global_budget_records_every_cluster(checkpoints, calib_file, tmp_path):
    result = moeshrink.prune(
        checkpoints["qwen3_moe"],
        "stun",
        keep=4,
        global_budget=True,
        calib=calib_file,
        output=tmp_path / "o",
        method_options={"selective": True},
        **KW,
    )
    choices = set()
    for lp in result.plan.layers:
        merged = sorted(sorted(e.sources) for e in lp.experts if len(e.sources) > 1)
        assert [r["sources"] for r in lp.details["selective"]] == merged
        for record in lp.details["selective"]:
            choices.add(record["choice"])
            assert all(
                np.isfinite(v) and v >= 0 for part in ("keep", "reconstruct") for v in record[part].values()
            )
    assert choices <= {"keep", "reconstruct"} and choices
    reloaded = load_model(tmp_path / "o").model
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_stun_global_budget_refuses_grouped_routing(checkpoints, calib_file, tmp_path):
    with pytest.raises(MoeShrinkError, match="routing groups"):
        moeshrink.prune(
            checkpoints["deepseek_v3"], "stun", keep=4, global_budget=True, calib=calib_file, **KW
        )


# --- NAEE -----------------------------------------------------------------------------------------


def _true_errors(model, adapter, layer, hidden, keep):
    """Squared error of the layer's MoE block output for every kept subset, through the model's own code."""
    block = layer.router
    while not hasattr(block, "experts") or block.experts is not layer.experts:  # the MoE block module
        block = next(m for m in model.modules() if getattr(m, "experts", None) is layer.experts)
    with torch.no_grad():
        full = block(hidden[None])
        full = full[0] if isinstance(full, tuple) else full
        errors = {}
        for subset in itertools.combinations(range(layer.num_experts), keep):
            mask = torch.zeros(layer.num_experts, dtype=torch.bool)
            mask[list(subset)] = True
            with restricted_routing(model, adapter, {layer.index: mask}):
                out = block(hidden[None])
                out = out[0] if isinstance(out, tuple) else out
            errors[subset] = float((out - full).double().pow(2).sum())
    return errors


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_naee_exhaustive_finds_the_best_subset_of_the_real_layer(family, checkpoints):
    loaded = load_model(checkpoints[family], "float32")
    model, adapter = loaded.model, loaded.adapter
    layer = adapter.moe_layers(model)[0]
    ids = torch.randint(0, 100, (3, 16))
    with LayerObserver(layer, {INPUTS, LOGITS}) as observer:
        model(ids)
    stats = observer.stats
    truth = _true_errors(model, adapter, layer, stats.inputs, 4)
    plan = NAEEPruning().plan_layer(layer, stats, LayerBudget(keep=4, top_k=layer.top_k))
    best = min(truth, key=truth.get)
    assert tuple(e.sources[0] for e in plan.experts) == best
    assert plan.details["search"] == "exhaustive" and plan.details["subsets_evaluated"] == len(truth)
    assert plan.details["error"] == pytest.approx(truth[best], rel=1e-4)

    greedy = NAEEPruning(max_subsets=1).plan_layer(layer, stats, LayerBudget(keep=4, top_k=layer.top_k))
    kept = tuple(e.sources[0] for e in greedy.experts)
    assert greedy.details["search"] == "greedy" and len(kept) == 4
    assert greedy.details["error"] == pytest.approx(truth[kept], rel=1e-4) and truth[kept] >= truth[best]
    assert greedy.details["subsets_evaluated"] < len(truth)


def test_naee_keeps_whole_groups(checkpoints, calib_file):
    result = moeshrink.prune(checkpoints["deepseek_v3"], "naee", keep=4, calib=calib_file, **KW)
    for lp in result.plan.layers:
        kept = [e.sources[0] for e in lp.experts]
        assert sum(j < 4 for j in kept) == 2 and sum(j >= 4 for j in kept) == 2  # 2 groups of 4 experts


# --- STUN phase 2: total sparsity, OWL, scopes ----------------------------------------------------


@pytest.mark.parametrize("sparsity_method", ["wanda", "owl"])
def test_total_sparsity_is_reached_exactly_and_accounted(sparsity_method, checkpoints, calib_file, tmp_path):
    family = "mixtral"
    original = load_model(checkpoints[family]).model
    adapter = ADAPTERS[family]
    weights_before = sum(
        layer.param(n).numel() for layer in adapter.moe_layers(original) for n in expert_weight_names(layer)
    )
    result = moeshrink.prune(
        checkpoints[family],
        "stun",
        ratio=0.25,
        total_sparsity=0.55,
        sparsity_method=sparsity_method,
        calib=calib_file,
        output=tmp_path / "o",
        **KW,
    )
    spec = result.plan.sparsity
    assert spec["removed_by_experts"] == 0.25 and spec["inside_sparsity"] == pytest.approx(0.4)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    layers = adapter.moe_layers(reloaded)
    nonzero = sum(int(layer.param(n).count_nonzero()) for layer in layers for n in expert_weight_names(layer))
    assert spec["total_sparsity_achieved"] == 1 - nonzero / weights_before
    assert abs(spec["total_sparsity_achieved"] - 0.55) < 0.005
    per_layer = [lp.sparsity["sparsity"] for lp in result.plan.layers]
    if sparsity_method == "owl":
        assert len(set(per_layer)) > 1 and sum(per_layer) / len(per_layer) == pytest.approx(0.4)
        assert all(0.4 - OWL_LAMBDA - 1e-9 <= s <= 0.4 + OWL_LAMBDA + 1e-9 for s in per_layer)
        assert spec["owl_lambda"] == OWL_LAMBDA == 0.02  # the default chosen on validation
    else:
        assert per_layer == [pytest.approx(0.4)] * len(per_layer)
    for layer, s in zip(layers, per_layer, strict=True):  # each row loses exactly round(s * columns)
        for e in range(layer.num_experts):
            for name in expert_weight_names(layer):
                w, _ = linear_view(layer, name, e)
                assert ((w == 0).sum(1) == round(s * w.shape[1])).all()
    assert "Total sparsity asked 55.0%" in (tmp_path / "o" / "README.md").read_text()


@pytest.mark.parametrize("lam", [0.0, 0.02])
def test_owl_lambda_bounds_each_layers_sparsity(lam, checkpoints, calib_file):
    """``owl_lambda`` reaches OWL's layer ratios and the plan: 0 is uniform (Wanda's budget), 0.02 keeps
    every layer within 0.02 of the mean and still varies them."""
    result = moeshrink.prune(
        checkpoints["mixtral"],
        "none",
        sparsity=0.5,
        sparsity_method="owl",
        owl_lambda=lam,
        calib=calib_file,
        **KW,
    )
    per_layer = [lp.sparsity["sparsity"] for lp in result.plan.layers]
    assert result.plan.sparsity["owl_lambda"] == lam
    assert sum(per_layer) / len(per_layer) == pytest.approx(0.5)
    assert all(abs(s - 0.5) <= lam + 1e-9 for s in per_layer)
    assert (len(set(per_layer)) == 1) == (lam == 0.0)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_scope_all_prunes_attention_and_dense_but_not_routers(family, checkpoints, calib_file, tmp_path):
    result = moeshrink.prune(
        checkpoints[family], "none", sparsity=0.5, sparsity_scope="all", calib=calib_file, **KW
    )
    model, adapter = result.model, ADAPTERS[family]
    moe_by_index = {m.index: m for m in adapter.moe_layers(model)}
    parts = set()
    for index, decoder_layer in enumerate(adapter.decoder_layers(model)):
        moe = moe_by_index.get(index)
        for name, module in scoped_linears(decoder_layer, moe, ("attention", "dense")).items():
            parts.add(name.split(".")[0])
            assert ((module.weight == 0).sum(1) == module.weight.shape[1] // 2).all(), name
        if moe is not None:
            assert int((moe.router.weight == 0).sum()) == 0
    assert "self_attn" in parts and "mlp" in parts  # shared experts or dense MLPs were pruned too
    original = load_model(checkpoints[family]).model
    for untouched in ("lm_head.weight", "model.embed_tokens.weight"):  # (a padding row may be zero already)
        before, after = original.get_parameter(untouched), model.get_parameter(untouched)
        assert int((after == 0).sum()) == int((before == 0).sum())
    if family == "deepseek_v3":  # its first layer is dense: visited too
        assert "0" in result.plan.sparsity["dense_layers"]


def test_attention_scope_alone_leaves_experts_dense(checkpoints, calib_file):
    result = moeshrink.prune(
        checkpoints["olmoe"], "none", sparsity=0.5, sparsity_scope="attention", calib=calib_file, **KW
    )
    assert result.sparsity.expert_fraction == 0.0 and result.sparsity.fraction > 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "stun", "ratio": 0.25, "total_sparsity": 1.0}, r"total sparsity must be in \[0, 1\)"),
        ({"method": "stun", "ratio": 0.5, "total_sparsity": 0.4}, "removing experts already takes away"),
        ({"method": "stun", "keep": 1}, "top-k"),
        ({"method": "stun", "ratio": 0.9, "total_sparsity": 0.95}, "top-k"),
        ({"method": "none", "sparsity": 0.5, "total_sparsity": 0.5}, "not both"),
        ({"method": "none", "nm": "2:4", "sparsity_method": "owl"}, "OWL sets a sparsity per layer"),
        ({"method": "none", "sparsity": 0.5, "owl_lambda": 0.1}, "needs --sparsity-method owl, not wanda"),
        ({"method": "none", "sparsity": 0.5, "sparsity_method": "owl", "owl_lambda": -0.1}, "owl_lambda"),
        ({"method": "none", "sparsity": 0.5, "sparsity_scope": "heads"}, "unknown sparsity scope"),
        ({"method": "stun", "keep": 4, "method_options": {"mode": "median"}}, "stun mode must be one of"),
        ({"method": "stun", "keep": 4, "method_options": {"selective": "maybe"}}, "stun selective must be"),
        (
            {"method": "stun", "keep": 4, "method_options": {"selective": True, "mode": "representative"}},
            "selective=true .* needs mode=average",
        ),
        (
            {"method": "stun", "keep": 4, "method_options": {"kept": "most_used", "selective": False}},
            "give selective=true",
        ),
        (
            {"method": "stun", "keep": 4, "method_options": {"selective": True, "kept": "last"}},
            "stun kept must be",
        ),
    ],
)
def test_bad_stun_budgets_fail_early(kwargs, message, checkpoints, calib_file, tmp_path):
    with pytest.raises(MoeShrinkError, match=message):
        moeshrink.prune(checkpoints["mixtral"], calib=calib_file, output=tmp_path / "o", **(KW | kwargs))
    assert not (tmp_path / "o").exists()


def test_stun_recipe_step(checkpoints, calib_file, tmp_path):
    from moeshrink.job import Job

    job = Job(steps=[{"stun": {"expert_ratio": 0.25, "total_sparsity": 0.55, "sparsity_method": "owl"}}])
    experts, sparsify = job.step_of("experts"), job.step_of("sparsify")
    assert (experts.method, experts.ratio, sparsify.total_sparsity, sparsify.method) == (
        "stun",
        0.25,
        0.55,
        "owl",
    )
    assert get_method("stun", mode="average").options["align"] == "weight"
