"""EEP from plain text (loss fitness, held-out selection), the time budget over the whole call,
and the search on DeepSeek's grouped routing: real tiny checkpoints, real text, real exports."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import load_model
from moeshrink.plan import PLAN_FILENAME
from moeshrink.search import search
from moeshrink.search.eep import Candidate, EEPSettings, _mutate_merge
from moeshrink.search.fitness import TaskFitness, build_text_split
from moeshrink.surgery.router_transfer import group_blocks
from moeshrink.testbed.tiny import build_tiny_model

# small windows of the shipped calibration text: 6 fitness + 3 held-out windows of 32 tokens
TEXT = dict(samples=6, select_samples=3, seq_len=32, progress=False)
SMALL = dict(population=3, prune_iterations=2, merge_iterations=2, **TEXT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eep_text")
    return {f: build_tiny_model(f, root / f, seed=3) for f in ("mixtral", "deepseek_v2", "deepseek_v3")}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_text_split_holds_out_selection_windows(tiny, calib_file):
    tokenizer = load_model(tiny["mixtral"]).tokenizer
    fit, select = build_text_split(tokenizer, [calib_file], samples=6, select_samples=3, seq_len=32)
    assert fit.input_ids.shape == (6, 32) and select.input_ids.shape == (3, 32)
    fit_rows = {tuple(r) for r in fit.input_ids.tolist()}
    assert not fit_rows & {tuple(r) for r in select.input_ids.tolist()}
    # the fitness of windows is the mean next-token loss over every token after each window's first
    loaded = load_model(tiny["mixtral"])
    fitness = TaskFitness(loaded.model, loaded.adapter, fit, objective="text", batch_size=4)
    logits = _logits(loaded.model, fit.input_ids).float()
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), fit.input_ids[:, 1:].reshape(-1)
    )
    layers = {i: torch.eye(8, dtype=torch.float64) for i in fitness.working.layers}
    scored = fitness.evaluate(layers, layers, top_k=2)
    assert scored.accuracy is None
    assert scored.nll == pytest.approx(float(expected), rel=1e-4)


def test_plain_text_search_end_to_end(tiny, calib_file, tmp_path):
    result = search(tiny["mixtral"], calib=[calib_file], keep=4, output=tmp_path / "o", **SMALL)
    plan = json.loads((tmp_path / "o" / PLAN_FILENAME).read_text())
    options = plan["method_options"]
    assert options["objective"] == "text" and options["fitness"]["accuracy"] is None
    assert options["fitness"]["selection"] is not None  # the best was scored on the held-out windows
    assert (
        plan["calibration"]["part"] == "fitness" and plan["calibration"]["selection"]["part"] == "selection"
    )
    assert options["run"]["stopped"] in ("completed", "early stopping")
    # the chosen candidate is the one with the best held-out loss among the scored leaders
    scored = [h["best"]["selection"] for h in result.state.history]
    assert result.best.fitness.selection == min(scored)
    ids = result.task_data.input_ids[:2]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    torch.testing.assert_close(_logits(exported, ids), _logits(result.model, ids), rtol=1e-5, atol=1e-5)


def test_patience_ends_a_stage_early(tiny, calib_file):
    result = search(
        tiny["mixtral"],
        calib=[calib_file],
        keep=4,
        patience=1,
        population=3,
        prune_iterations=30,
        merge_iterations=0,
        **TEXT,
    )
    assert len(result.state.history) < 30
    assert result.state.history[-1].get("early_stop")
    assert result.plan.method_options["run"]["stopped"] == "early stopping"


def test_time_budget_stops_mid_search_and_exports_the_best(tiny, calib_file, tmp_path):
    """The budget ends the search long before its generations are spent (a million merge generations);
    the best candidate so far is exported and the plan records that the time budget stopped it."""
    generations = 2 + 1_000_000
    text = tmp_path / "text.txt"  # a few thousand tokens: loading and seeding stay a small part of the budget
    text.write_text(calib_file.read_text()[:12000])
    result = search(
        tiny["mixtral"],
        calib=[text],
        keep=4,
        population=3,
        prune_iterations=2,
        merge_iterations=1_000_000,
        patience=None,
        time_budget=15.0,
        output=tmp_path / "o",
        **TEXT,
    )
    plan = json.loads((tmp_path / "o" / PLAN_FILENAME).read_text())
    run = plan["method_options"]["run"]
    assert run["stopped"] == "time budget" and run["time_budget"] == 15.0
    assert 0 < run["generations"] < generations
    assert result.seconds["total"] > 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "o")  # a complete, loadable checkpoint


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_grouped_routing_search_exports_what_it_scored(family, tiny, calib_file, tmp_path):
    """DeepSeek: each group keeps 2 of its 4 experts and merges only its own; the output loads in
    transformers and computes what the in-memory candidate computes."""
    result = search(
        tiny[family], calib=[calib_file], keep=4, output=tmp_path / "o", merge_scope="all", **SMALL
    )
    for lp in result.plan.layers:
        for new, expert in enumerate(lp.experts):
            group = new // 2  # new experts 0-1 route in group 0, 2-3 in group 1
            assert all(s // 4 == group for s in expert.sources), (lp.layer, new, expert.sources)
    ids = result.task_data.input_ids[:2]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    torch.testing.assert_close(_logits(exported, ids), _logits(result.model, ids), rtol=1e-5, atol=1e-5)
    # the one-hot best of the prune stage is scored exactly: exported plain pruning gives its loss
    prune = result.best_prune
    loaded = load_model(tiny[family])
    fit = TaskFitness(loaded.model, loaded.adapter, result.task_data, objective="text", batch_size=8)
    assert fit.evaluate(prune.merge, prune.transfer, 2).nll == pytest.approx(prune.fitness.nll, rel=1e-6)


def test_merge_mutations_stay_within_routing_groups():
    settings = EEPSettings(keep=4, top_k=2, groups=2, merge_rate=1.0)
    start = Candidate.pruning({1: [0, 2, 5, 7]}, 8)
    child = _mutate_merge(start, settings, torch.Generator().manual_seed(0), start.kept())
    outside = ~group_blocks(8, 4, 2)
    assert torch.all(child.merge[1][outside] == 0) and torch.all(child.transfer[1][outside] == 0)
    assert not torch.equal(child.merge[1], start.merge[1])  # it did move inside the groups


def test_bad_inputs_fail_before_writing(tiny, calib_file, tmp_path):
    out = tmp_path / "o"
    short = tmp_path / "short.txt"
    short.write_text("A few words of text.")
    with pytest.raises(
        MoeShrinkError, match=r"too short for the fitness/selection split.*6 fitness \+ 3 selection"
    ):
        search(tiny["mixtral"], calib=[short], keep=4, output=out, **SMALL)
    with pytest.raises(MoeShrinkError, match="--time-budget 0.01s is too short"):
        search(tiny["mixtral"], calib=[calib_file], keep=4, output=out, time_budget=0.01, **SMALL)
    with pytest.raises(MoeShrinkError, match="positive number of seconds"):
        search(tiny["mixtral"], calib=[calib_file], keep=4, output=out, time_budget=-5, **SMALL)
    with pytest.raises(MoeShrinkError, match="not both"):
        search(tiny["mixtral"], "moeshrink_wiki", calib=[calib_file], keep=4, output=out, **SMALL)
    with pytest.raises(MoeShrinkError, match="give the search's data"):
        search(tiny["mixtral"], keep=4, output=out, **SMALL)
    with pytest.raises(MoeShrinkError, match="calibration file not found"):
        search(tiny["mixtral"], calib=[tmp_path / "missing.txt"], keep=4, output=out, **SMALL)
    assert not out.exists()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_recovery_after_the_search(family, tiny, calib_file, tmp_path):
    """--recover: the best candidate goes through the recover step before the export; the plan records
    the fitted error per layer, and the plan re-applied to the source gives the exported weights."""
    from moeshrink.pipeline import apply_plan

    out = tmp_path / "o"
    result = search(
        tiny[family], calib=[calib_file], keep=4, output=out, recover=True, recover_samples=8, **SMALL
    )
    plan = json.loads((out / PLAN_FILENAME).read_text())
    assert plan["method"] == "eep" and plan["recovery"]["ridge"] == 1.0
    errors = [lp["recovery"] for lp in plan["layers"] if lp.get("recovery")]
    assert errors and all(e["after"] <= e["before"] + 1e-9 for e in errors)
    assert any(e["after"] < e["before"] for e in errors)
    assert plan["calibration"]["recovery"] == {"samples": 8, "seq_len": 32, "seed": 0}
    ids = result.task_data.input_ids[:2]
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(exported, ids), _logits(result.model, ids), rtol=1e-5, atol=1e-5)
    again = apply_plan(tiny[family], out / PLAN_FILENAME).model
    torch.testing.assert_close(_logits(again, ids), _logits(result.model, ids), rtol=1e-5, atol=1e-5)


def test_recovery_options_fail_before_work(tiny, calib_file, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(MoeShrinkError, match="--recover fits on calibration text"):
        search(tiny["mixtral"], "moeshrink_wiki", keep=4, output=out, recover=True, **SMALL)
    with pytest.raises(MoeShrinkError, match="add --recover"):
        search(tiny["mixtral"], calib=[calib_file], keep=4, output=out, recover_ridge=0.5, **SMALL)
    with pytest.raises(MoeShrinkError, match=r"--recover-ridge must be in \(0, 100\]"):
        search(
            tiny["mixtral"], calib=[calib_file], keep=4, output=out, recover=True, recover_ridge=0, **SMALL
        )
    assert not out.exists()
