"""EEP search: pruning candidates are plain pruning, the search is reproducible and resumable,
bad budgets fail early, 2 gloo processes search what 1 does, and exports re-apply."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import load_model
from moeshrink.pipeline import apply_plan
from moeshrink.plan import PLAN_FILENAME, LayerPlan, ModelPlan
from moeshrink.search import search
from moeshrink.search.eep import Candidate, fold_error, fold_router
from moeshrink.search.fitness import TaskFitness, build_task_data, read_items, transfer_logits
from moeshrink.surgery import apply_model_plan
from moeshrink.surgery.simulate import restricted_routing
from moeshrink.testbed.tiny import build_tiny_model

SMALL = dict(items=4, population=3, prune_iterations=2, merge_iterations=2, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eep")
    families = ("mixtral", "qwen2_moe", "gpt_oss", "phimoe", "deepseek_v2", "deepseek_v3")
    return {f: build_tiny_model(f, root / f, seed=3) for f in families}


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """Multiple-choice items cut from real text (this project's plan module)."""
    from moeshrink import plan

    words = open(plan.__file__).read().split()
    items = []
    for n in range(6):
        start = 40 * n
        context = " ".join(words[start : start + 12])
        choices = [" ".join(words[start + 12 + 7 * c : start + 19 + 7 * c]) for c in range(4)]
        items.append({"context": context, "choices": choices, "gold": n % 4, "id": str(n)})
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def _fitness(checkpoint, task_file):
    loaded = load_model(checkpoint)
    data = build_task_data(loaded.tokenizer, read_items(task_file))
    return loaded, TaskFitness(loaded.model, loaded.adapter, data, batch_size=8)


@pytest.mark.parametrize(
    "family", ["mixtral", "qwen2_moe", "gpt_oss", "phimoe", "deepseek_v2", "deepseek_v3"]
)
def test_one_hot_candidate_is_plain_pruning(family, tiny, task_file):
    loaded, fitness = _fitness(tiny[family], task_file)
    model, adapter = loaded.model, loaded.adapter
    layers = adapter.moe_layers(model)
    num_experts = layers[0].num_experts
    kept = {layer.index: [0, 2, 5, 7] for layer in layers}
    candidate = Candidate.pruning(kept, num_experts)
    ids = fitness.data.input_ids[:8]
    original_gate_up = layers[0].param("gate_up_proj").detach().clone()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with fitness.working.applied(candidate.merge, candidate.transfer, top_k=2):
            assert torch.equal(layers[0].param("gate_up_proj"), original_gate_up[kept[layers[0].index]])
            searched = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, before)  # the working copy restores the model
        allowed = {i: torch.isin(torch.arange(num_experts), torch.tensor(k)) for i, k in kept.items()}
        with restricted_routing(model, adapter, allowed):
            masked = model(input_ids=ids).logits
    torch.testing.assert_close(searched, masked, rtol=0, atol=1e-5)

    coefficients, plans = fold_router(candidate, fitness, top_k=2)
    assert [lp.experts for lp in plans] == [
        LayerPlan.keep(i, num_experts, k).experts for i, k in kept.items()
    ]
    assert all(torch.equal(c, candidate.transfer[i]) for i, c in coefficients.items())
    error = fold_error(candidate, coefficients, fitness.working, ids, top_k=2)
    assert all(e["same_experts"] == 1.0 and e["total_variation"] == 0.0 for e in error.values())
    pruned = load_model(tiny[family]).model
    apply_model_plan(pruned, adapter, ModelPlan(method="eep", budget={"keep": 4}, top_k=2, layers=plans))
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, searched, rtol=0, atol=1e-5)


def _signature(result):
    return result.best.signature(), result.best.fitness, result.best_prune.signature()


def test_fixed_seed_reproduces(tiny, task_file):
    a = search(tiny["mixtral"], task_file, keep=4, seed=7, **SMALL)
    b = search(tiny["mixtral"], task_file, keep=4, seed=7, **SMALL)
    assert _signature(a) == _signature(b)
    assert [h["best"] for h in a.state.history] == [h["best"] for h in b.state.history]
    assert len(a.state.history) == 4 and a.state.evaluations > 0


def test_resumed_search_ends_where_uninterrupted_ends(tiny, task_file, tmp_path):
    whole = search(tiny["mixtral"], task_file, keep=4, seed=1, **SMALL)
    # stopped after 3 generations (inside the merge stage), then resumed from the saved state
    search(tiny["mixtral"], task_file, keep=4, seed=1, state_dir=tmp_path / "state", stop_after=3, **SMALL)
    saved = json.loads((tmp_path / "state" / "eep_state.json").read_text())
    assert saved["stage"] == "merge" and len(saved["history"]) == 3
    resumed = search(tiny["mixtral"], task_file, keep=4, seed=1, state_dir=tmp_path / "state", **SMALL)
    assert _signature(resumed) == _signature(whole)
    assert [h["best"] for h in resumed.state.history] == [h["best"] for h in whole.state.history]
    with pytest.raises(MoeShrinkError, match="belongs to another search"):
        search(tiny["mixtral"], task_file, keep=4, seed=2, state_dir=tmp_path / "state", **SMALL)


@pytest.mark.parametrize(
    "keep, top_k, message",
    [
        (1, None, "fewer than the 2 each token uses"),
        (9, None, "removes nothing"),
        (8, None, "removes nothing"),
    ],
)
def test_bad_budget_fails_before_loading(keep, top_k, message, tiny, tmp_path):
    with pytest.raises(MoeShrinkError, match=message):
        search(tiny["mixtral"], tmp_path / "missing.jsonl", keep=keep, top_k=top_k, **SMALL)


def test_two_processes_search_what_one_does_and_export_reapplies(tiny, task_file, tmp_path):
    one = tmp_path / "one"
    search(tiny["mixtral"], task_file, keep=4, seed=5, output=one, **SMALL)
    args = ["search", str(tiny["mixtral"]), "--task", str(task_file), "--keep", "4", "--seed", "5"]
    args += ["--items", "4", "--population", "3", "--prune-iterations", "2", "--merge-iterations", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        cmd + ["-m", "moeshrink", *args, "-o", str(tmp_path / "two"), "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = [json.loads((tmp_path / d / PLAN_FILENAME).read_text()) for d in ("one", "two")]
    assert plans[1]["calibration"]["processes"] == 2
    for p in plans:
        p["calibration"].pop("processes"), p["method_options"].pop("search_seconds")
        for timed in ("seconds_before_export", "export_reserve"):  # wall times of this call
            p["method_options"]["run"].pop(timed)
    assert plans[0] == plans[1]
    weights = [load_file(tmp_path / d / "model.safetensors") for d in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    reapplied = apply_plan(tiny["mixtral"], one / PLAN_FILENAME, tmp_path / "again")
    assert reapplied.after.experts_per_layer == [4] * len(plans[0]["layers"])
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(again[k], weights[0][k]) for k in weights[0])


def test_merged_candidate_exact_transfer_and_fold(tiny, task_file):
    loaded, fitness = _fitness(tiny["mixtral"], task_file)
    model, adapter = loaded.model, loaded.adapter
    layers = adapter.moe_layers(model)
    candidate = Candidate.pruning({layer.index: [0, 2, 5, 7] for layer in layers}, 8)
    for i in candidate.merge:  # new expert 0 = average of old 0 and 1, and gets both their router mass
        candidate.merge[i][0, :2] = 0.5
        candidate.transfer[i][0, :2] = 1.0
    down = layers[0].param("down_proj").detach().clone()
    ids = fitness.data.input_ids[:8]
    with fitness.working.applied(candidate.merge, candidate.transfer, top_k=2):
        merged = (0.5 * down[0].float() + 0.5 * down[1].float()).to(down.dtype)
        assert torch.equal(layers[0].param("down_proj")[0], merged)
        logits = torch.randn(5, 8)
        new = transfer_logits(layers[0], logits, candidate.transfer[0])
        torch.testing.assert_close(new[:, 0], torch.logsumexp(logits[:, :2], dim=1))
        torch.testing.assert_close(new[:, 1:], logits[:, [2, 5, 7]])

    coefficients, plans = fold_router(candidate, fitness, top_k=2)
    first = plans[0].experts[0]
    assert first.sources == [0, 1] and first.weights == [0.5, 0.5]
    assert first.router_weights == coefficients[0][0, :2].tolist()
    assert all(e.is_plain_copy for e in plans[0].experts[1:])
    error = fold_error(candidate, coefficients, fitness.working, ids, top_k=2)
    # a mixed row cannot fold exactly (one-hot rows measure 0 above); the measure sees the difference
    assert all(0 < e["total_variation"] < 1 and 0 <= e["same_experts"] < 1 for e in error.values())

    exported = load_model(tiny["mixtral"]).model
    router = adapter.moe_layers(exported)[0].router.weight.detach().clone()
    apply_model_plan(exported, adapter, ModelPlan(method="eep", budget={"keep": 4}, top_k=2, layers=plans))
    row = (coefficients[0][0, :2].float() @ router[:2].float()).to(router.dtype)
    torch.testing.assert_close(adapter.moe_layers(exported)[0].router.weight[0], row)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_exact_router_export_reloads_the_exact_transfer(family, tiny, task_file, tmp_path):
    """A merged candidate saved with its exact transfer: moeshrink's loader routes exactly as the search
    scored it; plain from_pretrained (and exact_router=False) get the folded standard router. DeepSeek-V3:
    the merged expert (old 0 and 1, both of group 0) routes in group 0 with the mean of their biases."""
    from transformers import AutoModelForCausalLM

    from moeshrink.io.export import export_checkpoint
    from moeshrink.surgery.router_transfer import TRANSFER_FILENAME, transfer_state

    loaded, fitness = _fitness(tiny[family], task_file)
    model, adapter = loaded.model, loaded.adapter
    layers = adapter.moe_layers(model)
    candidate = Candidate.pruning({layer.index: [0, 2, 5, 7] for layer in layers}, 8)
    for i in candidate.merge:
        candidate.merge[i][0, :2] = 0.5
        candidate.transfer[i][0, :2] = 1.0
    ids = fitness.data.input_ids[:4]
    with fitness.working.applied(candidate.merge, candidate.transfer, top_k=2), torch.no_grad():
        exact = model(ids).logits
    _, plans = fold_router(candidate, fitness, top_k=2)
    routers = {layer.index: dict(layer.router_tensors()) for layer in layers}
    sidecar = transfer_state(routers, candidate.transfer)
    plan = ModelPlan(method="eep", budget={"keep": 4}, top_k=2, layers=plans)
    apply_model_plan(model, adapter, plan)
    export_checkpoint(
        model,
        adapter,
        plan,
        tmp_path / "o",
        tokenizer=loaded.tokenizer,
        sidecars={TRANSFER_FILENAME: sidecar},
    )
    with torch.no_grad():
        reloaded = load_model(tmp_path / "o").model(ids).logits
        folded = load_model(tmp_path / "o", exact_router=False).model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()(ids).logits
    torch.testing.assert_close(reloaded, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(folded, exact, atol=1e-4)  # a mixed row does not fold exactly

    result = search(tiny[family], task_file, keep=4, output=tmp_path / "s", exact_router=True, **SMALL)
    assert (tmp_path / "s" / TRANSFER_FILENAME).is_file()
    assert result.plan.method_options["exact_router"] == TRANSFER_FILENAME
    load_model(tmp_path / "s")  # installs the transfer without complaint


def test_active_experts_search_per_layer_top_k_and_reload(tiny, task_file, tmp_path):
    """With a mean of 1.5 active experts the search picks each layer's top-k (1 or 2, the total fixed);
    the export records them and moeshrink's loader routes each layer with its own."""
    from transformers import AutoModelForCausalLM

    from moeshrink.surgery.apply import TOP_K_PER_LAYER_KEY

    kwargs = SMALL | dict(keep=4, active_experts=1.5, seed=1)
    result = search(tiny["mixtral"], task_file, output=tmp_path / "o", **kwargs)
    per_layer = result.best.top_k
    assert set(per_layer.values()) <= {1, 2} and sum(per_layer.values()) == round(1.5 * len(per_layer))
    again = search(tiny["mixtral"], task_file, **kwargs)
    assert again.best.top_k == per_layer and again.best.signature() == result.best.signature()

    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["num_experts_per_tok"] == 2
    assert [config[TOP_K_PER_LAYER_KEY][i] for i in sorted(per_layer)] == [
        per_layer[i] for i in sorted(per_layer)
    ]
    reloaded = load_model(tmp_path / "o")
    assert {layer.index: layer.top_k for layer in reloaded.adapter.moe_layers(reloaded.model)} == per_layer
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():  # the search's exported model in memory routes the same way
        torch.testing.assert_close(reloaded.model(ids).logits, result.model(ids).logits, rtol=1e-5, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "o")  # transformers: the largest top-k everywhere
    assert {layer.top_k for layer in reloaded.adapter.moe_layers(plain)} == {2}


@pytest.mark.parametrize("active", [0.5, 2.5])
def test_bad_active_experts_fail_early(active, tiny, task_file, tmp_path):
    with pytest.raises(MoeShrinkError, match="active experts per token must lie in"):
        search(tiny["mixtral"], task_file, keep=4, active_experts=active, output=tmp_path / "o", **SMALL)
    assert not (tmp_path / "o").exists()
