"""The demo and ``moeshrink eval`` end to end, on a tiny model that speaks the testbed tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeshrink.cli import main
from moeshrink.demo import run_demo
from moeshrink.testbed import paths
from moeshrink.testbed.tiny import randomize_routers, tiny_config


@pytest.fixture(scope="module")
def testbed_like(tmp_path_factory):
    """A random 16-expert Mixtral with the testbed's 8k vocabulary and tokenizer."""
    out = tmp_path_factory.mktemp("tb") / "tiny-testbed"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral", vocab_size=8192, num_local_experts=16))
    randomize_routers(model, "mixtral")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(paths.tokenizer_dir()).save_pretrained(out)
    return out


def test_demo_writes_report_plots_and_loadable_models(testbed_like, tmp_path):
    out = tmp_path / "demo"
    report = run_demo(
        out,
        model=testbed_like,
        methods=["frequency", "uncurl"],
        task_limit=4,
        eval_tokens=512,
        samples=8,
        progress=False,
    )
    assert report == out / "report.md"
    text = report.read_text()
    assert (
        "| frequency | 8 | 2 |" in text and "| uncurl | 8 | 2 |" in text and "acc_mi moeshrink_wiki" in text
    )
    data = json.loads((out / "report.json").read_text())
    assert set(data["results"]) == {"unpruned", "frequency", "uncurl"}
    usage = data["results"]["unpruned"]["domains"]["wiki"]["expert_usage"]
    assert len(usage) == 3 and all(sum(row) == pytest.approx(2.0) for row in usage)
    for name in ("perplexity.png", "expert_usage.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    model = AutoModelForCausalLM.from_pretrained(out / "models" / "uncurl")
    assert model.config.num_local_experts == 8


def test_demo_verifies_each_output_in_a_fresh_process(testbed_like, tmp_path, monkeypatch, capsys):
    """With verification on (as for users), each output is checked in a fresh process while the demo
    evaluates it, and its plan and model card record the outcome, as prune writes them."""
    monkeypatch.setenv("MOESHRINK_VERIFY", "1")
    out = tmp_path / "demo"
    run_demo(out, model=testbed_like, methods=["frequency"], task_limit=2, eval_tokens=256, samples=4)
    plan = json.loads((out / "models" / "frequency" / "moeshrink_plan.json").read_text())
    assert plan["verification"]["transformers"]["status"] == "pass"
    assert "fresh process" in (out / "models" / "frequency" / "README.md").read_text()
    printed = capsys.readouterr().out
    assert "frequency: output verified in a fresh process (transformers pass" in printed
    assert "[demo] wall time" in printed


def test_eval_compares_models_side_by_side(testbed_like, tmp_path, capsys):
    argv = ["eval", str(testbed_like), str(testbed_like), "--tasks", "moeshrink_bible", "--task-limit", "4"]
    argv += ["--max-tokens", "512", "--no-speed", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ppl wiki" in printed and "acc_mi moeshrink_bible" in printed
    results = json.loads((tmp_path / "r.json").read_text())
    assert list(results) == ["tiny-testbed", "tiny-testbed #2"]  # the same path twice: both kept
    for result in results.values():
        assert 0.0 <= result["tasks"]["moeshrink_bible"]["acc"] <= 1.0


def test_eval_keeps_outputs_with_the_same_directory_name_apart(testbed_like, tmp_path, capsys):
    """``eval a/pruned b/pruned`` keys the results by the shortest path suffix that tells them apart,
    so neither overwrites the other."""
    import shutil

    from moeshrink.io.checkpoint import load_model

    for parent in ("a", "b"):
        shutil.copytree(testbed_like, tmp_path / parent / "pruned")
    b = load_model(tmp_path / "b" / "pruned").model  # b differs from a: one router row zeroed
    with torch.no_grad():
        b.model.layers[0].mlp.gate.weight[0] = 0
    b.save_pretrained(tmp_path / "b" / "pruned")
    argv = ["eval", str(tmp_path / "a" / "pruned"), str(tmp_path / "b" / "pruned"), "--domains", "wiki"]
    argv += ["--max-tokens", "512", "--no-speed", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert list(results) == ["a/pruned", "b/pruned"]
    a_ppl, b_ppl = (results[k]["domains"]["wiki"]["perplexity"] for k in ("a/pruned", "b/pruned"))
    assert a_ppl != b_ppl
    printed = capsys.readouterr().out
    assert "a/pruned" in printed and "b/pruned" in printed


def test_result_labels():
    from moeshrink.cli import result_labels

    assert result_labels(["x/a/p", "y/a/p", "z/b/p", "q"]) == ["x/a/p", "y/a/p", "b/p", "q"]
    assert result_labels(["m", "./m"]) == ["m", "m #2"]


def test_eval_rejects_unknown_task_before_loading(testbed_like, capsys):
    assert main(["eval", str(testbed_like), "--tasks", "no_such_task_zz9"]) == 2
    err = capsys.readouterr().err
    assert "no_such_task_zz9" in err and "moeshrink_wiki" in err


def test_eval_rejects_missing_data(testbed_like, tmp_path, capsys):
    assert main(["eval", str(testbed_like), "--data", str(tmp_path / "nowhere"), "--no-speed"]) == 2
    assert "evaluation data directory not found" in capsys.readouterr().err


def test_domain_expert_information_bounds():
    from moeshrink.report.report import domain_expert_information

    separate = {"a": [[1.0, 1.0, 0.0, 0.0]], "b": [[0.0, 0.0, 1.0, 1.0]]}
    shared = {"a": [[0.5, 0.5, 0.5, 0.5]], "b": [[0.5, 0.5, 0.5, 0.5]]}
    assert domain_expert_information(separate) == pytest.approx([1.0])
    assert domain_expert_information(shared) == pytest.approx([0.0])


@pytest.mark.slow
def test_demo_on_the_shipped_testbed(tmp_path):
    """The real demo on the trained testbed: every method ranks above random on the calibrated domain."""
    report = run_demo(tmp_path / "demo", task_limit=20, eval_tokens=4096, progress=False)
    results = json.loads((report.parent / "report.json").read_text())["results"]
    base = results["unpruned"]["domains"]["wiki"]["perplexity"]
    random_ratio = results["random"]["domains"]["wiki"]["perplexity"] / base
    for method in ("frequency", "reap", "msmoe", "uncurl"):
        assert results[method]["domains"]["wiki"]["perplexity"] / base < random_ratio
