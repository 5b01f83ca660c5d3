"""The recover step: it lowers each layer's recorded error (checked against a hand computation), its
output reloads in transformers and re-applies from its plan, streamed equals resident (with a global
budget), and bad input stops it early with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moeshrink
from moeshrink.arch import split_router_output
from moeshrink.engine.data import build_calibration
from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import load_model

SAMPLES, SEQ_LEN = 4, 32  # 128 tokens: every one is in the layer's sample (at most 16384)


def _prune(model, calib, **kw):
    args = dict(method="frequency", keep=4, calib=calib, samples=SAMPLES, seq_len=SEQ_LEN, progress=False)
    return moeshrink.prune(model, **(args | kw))


def _tensors(directory) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("model*.safetensors")):
        out.update(load_file(file))
    return out


def _routed_output(block, router, experts, x: torch.Tensor) -> torch.Tensor:
    """The routed experts' output of one MoE block on ``x`` through the model's own router and experts."""
    _, weights, index = split_router_output(router(x.to(router.weight.dtype)))
    weight = next(experts.parameters())
    return experts(x.to(weight.dtype), index, weights.to(weight.dtype)).double()


def _first_moe_error(original, compressed, ids: torch.Tensor) -> float:
    """Relative error of the first MoE layer's routed output, both fed the original model's inputs."""
    adapter = original.adapter
    first = adapter.moe_layers(original.model)[0]
    captured = []
    handle = first.block.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        original.model(input_ids=ids)
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).float()
    after = adapter.moe_layers(compressed)[0]
    with torch.no_grad():
        y = _routed_output(first.block, first.router, first.experts, x)
        y_hat = _routed_output(after.block, after.router, after.experts, x)
    return float((y_hat - y).pow(2).sum() / y.pow(2).sum())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_recovery_lowers_the_layer_error_reloads_and_reapplies(family, checkpoints, calib_file, tmp_path):
    keep = 4
    plain = _prune(checkpoints[family], calib_file, keep=keep)
    recovered = _prune(checkpoints[family], calib_file, keep=keep, recover=True, output=tmp_path / "out")
    plan = recovered.plan
    assert plan.recovery["ridge"] == 1.0 and plan.recovery["mean_after"] < plan.recovery["mean_before"]
    for lp in plan.layers:
        assert lp.recovery["after"] < lp.recovery["before"], (lp.layer, lp.recovery)
        assert lp.recovery["tokens"] == SAMPLES * SEQ_LEN
        assert all("down_proj" in e.refit for e in lp.experts)
    # the recorded errors are the routed output's relative error, by a hand computation
    original = load_model(checkpoints[family])
    ids = build_calibration(original.tokenizer, [calib_file], SAMPLES, SEQ_LEN).input_ids
    first = plan.layers[0].recovery
    assert _first_moe_error(original, plain.model, ids) == pytest.approx(first["before"], rel=1e-3)
    assert _first_moe_error(original, recovered.model, ids) == pytest.approx(first["after"], rel=1e-3)
    # the output is a standard checkpoint: plain transformers loads it and computes what memory did
    out = tmp_path / "out"
    assert [f.name for f in out.glob("*.safetensors")] == ["model.safetensors"]
    saved = json.loads((out / "moeshrink_plan.json").read_text())
    assert saved["layers"][0]["recovery"]["after"] == first["after"]
    assert "Recovery" in (out / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = recovered.model(input_ids=ids[:2]).logits
        assert torch.allclose(reloaded(input_ids=ids[:2]).logits, expected, atol=1e-4, rtol=1e-4)
    # the plan (and its re-fitted tensors, router rows included) reproduces the checkpoint
    moeshrink.apply_plan(checkpoints[family], out / "moeshrink_plan.json", tmp_path / "again")
    first_file, second = (
        load_file(out / "model.safetensors"),
        load_file(tmp_path / "again" / "model.safetensors"),
    )
    assert sorted(first_file) == sorted(second)
    assert all(torch.equal(first_file[k], second[k]) for k in first_file)


def test_router_rows_are_refitted_where_they_help(checkpoints, calib_file):
    """Where a layer's fitted rows lowered its error they are in the model; elsewhere the pruned rows stay."""
    plain = _prune(checkpoints["mixtral"], calib_file, keep=3)
    recovered = _prune(checkpoints["mixtral"], calib_file, keep=3, recover=True)
    adapter = load_model(checkpoints["mixtral"]).adapter
    pairs = zip(adapter.moe_layers(plain.model), adapter.moe_layers(recovered.model), strict=True)
    for lp, (a, b) in zip(recovered.plan.layers, pairs, strict=True):
        fitted = lp.recovery["router"] == "fitted"
        assert torch.equal(a.router.weight, b.router.weight) != fitted, lp.recovery
        assert lp.recovery["router_moved"] > 0
        assert fitted == all("router.weight" in e.refit for e in lp.experts)
    assert recovered.plan.recovery["router_fitted_layers"] >= 1


def test_streamed_recovery_with_a_global_budget_equals_resident(checkpoints, calib_file, tmp_path):
    kwargs = dict(method="reap", keep=4, global_budget=True, recover=True)
    _prune(checkpoints["qwen3_moe"], calib_file, output=tmp_path / "resident", stream=False, **kwargs)
    streamed = _prune(
        checkpoints["qwen3_moe"], calib_file, output=tmp_path / "streamed", stream=True, **kwargs
    )
    assert len(set(streamed.plan.num_experts_after)) > 1  # the global budget shared the experts out unevenly
    a, b = _tensors(tmp_path / "resident"), _tensors(tmp_path / "streamed")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5, rtol=1e-4), key
    plans = [json.loads((tmp_path / d / "moeshrink_plan.json").read_text()) for d in ("resident", "streamed")]
    for x, y in zip(plans[0]["layers"], plans[1]["layers"], strict=True):
        assert x["recovery"]["after"] == pytest.approx(y["recovery"]["after"], rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"method": "none", "keep": None, "top_k": 1}, "nothing to recover"),
        ({"method": None, "keep": None, "steps": [{"recover": {}}]}, "nothing to recover"),
        ({"recover_ridge": 0.0}, r"ridge \(--recover-ridge\): Input should be greater than 0"),
        ({"recover_ridge": -1.0}, r"ridge \(--recover-ridge\): Input should be greater than 0"),
        ({"recover_ridge": 1000.0}, r"\(--recover-ridge\): Input should be less than or equal to 100"),
        ({"recover": None, "recover_ridge": 0.1}, "add --recover"),
        ({"calib": None}, "recovery needs calibration text"),
        (
            {
                "method": None,
                "keep": None,
                "steps": [{"recover": {}}, {"experts": {"method": "frequency", "keep": 4}}],
            },
            "nothing to recover",
        ),
        (
            {"steps": [{"experts": {"method": "frequency", "keep": 4}}, {"recover": {}}, {"top_k": 1}]},
            "right after the experts step",
        ),
    ],
)
def test_bad_recovery_input(kwargs, expected, checkpoints, calib_file, tmp_path):
    args = dict(method="random", keep=4, recover=True, calib=calib_file) | kwargs
    with pytest.raises(MoeShrinkError, match=expected) as err:
        moeshrink.prune(checkpoints["mixtral"], output=tmp_path / "out", progress=False, **args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_recover_from_the_command_line_and_a_recipe(checkpoints, calib_file, tmp_path, capsys):
    from moeshrink.cli import main

    common = ["--calib", str(calib_file), "--samples", "4", "--seq-len", "32", "--quiet"]
    argv = ["prune", str(checkpoints["mixtral"]), "--method", "reap", "--keep", "4", "--top-k", "1"]
    assert main([*argv, *common, "--recover", "--recover-ridge", "0.1", "-o", str(tmp_path / "a")]) == 0
    plan = json.loads((tmp_path / "a" / "moeshrink_plan.json").read_text())
    assert plan["recovery"]["ridge"] == 0.1 and plan["top_k"] == 1
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {checkpoints['mixtral']}\nsteps:\n  - experts: {{method: reap, keep: 4}}\n"
        "  - recover: {ridge: 0.5, router: false}\n"
    )
    assert main(["prune", "--recipe", str(recipe), *common, "-o", str(tmp_path / "b")]) == 0
    plan = json.loads((tmp_path / "b" / "moeshrink_plan.json").read_text())
    assert plan["recovery"]["ridge"] == 0.5 and plan["recovery"]["router"] is False
    assert all("router" not in lp["recovery"] for lp in plan["layers"])
    capsys.readouterr()
    assert main([*argv, *common, "--recover-ridge", "200", "--recover", "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--recover-ridge" in err and "100" in err and "\n" not in err
    assert not (tmp_path / "c").exists()
