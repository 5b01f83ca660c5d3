"""End to end on every family: prune, export, reload in a fresh process, compare with the original.

A pruned checkpoint must reload with plain ``AutoModelForCausalLM.from_pretrained`` with no
missing, unexpected or mismatched keys, and its logits must equal the original model's with the
dropped experts masked out of routing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moeshrink
from moeshrink.arch import ADAPTERS
from moeshrink.plan import PLAN_FILENAME, ModelPlan
from moeshrink.surgery.simulate import restricted_routing

from .conftest import FAMILIES, KEEP, tree_digest

TOP_K_FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"]

RELOAD_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from moeshrink.arch import ADAPTERS
jobs = json.loads(sys.argv[1])
input_ids = torch.load(sys.argv[2])
results = {}
for name, directory in jobs.items():
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    model.eval()
    layers = ADAPTERS[model.config.model_type].moe_layers(model)
    with torch.no_grad():
        logits = model(input_ids).logits
    results[name] = {
        "logits": logits,
        "missing": list(info["missing_keys"]),
        "unexpected": list(info["unexpected_keys"]),
        "mismatched": [str(m) for m in info["mismatched_keys"]],
        "experts": [layer.num_experts for layer in layers],
        "router_top_k": [layer.top_k for layer in layers],
        "config_top_k": model.config.num_experts_per_tok,
    }
torch.save(results, sys.argv[3])
"""


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    return torch.randint(1, 400, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def pruned(checkpoints, calib_file, tmp_path_factory):
    """Prune every family (frequency, keep 4) and the top-k families (also top-k 1); inputs untouched."""
    root = tmp_path_factory.mktemp("pruned")
    outputs = {}
    for family in FAMILIES:
        before = tree_digest(checkpoints[family])
        runs = [(family, None)] + ([(f"{family}-top1", 1)] if family in TOP_K_FAMILIES else [])
        for name, top_k in runs:
            moeshrink.prune(
                checkpoints[family],
                "frequency",
                keep=KEEP[family],
                calib=calib_file,
                output=root / name,
                samples=8,
                seq_len=32,
                top_k=top_k,
                progress=False,
            )
            outputs[name] = root / name
        assert tree_digest(checkpoints[family]) == before, f"{family}: the input checkpoint was modified"
    return outputs


@pytest.fixture(scope="session")
def reloaded(pruned, input_ids, tmp_path_factory):
    """Reload every output in one fresh Python process."""
    work = tmp_path_factory.mktemp("reload")
    torch.save(input_ids, work / "ids.pt")
    jobs = {name: str(path) for name, path in pruned.items()}
    subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, json.dumps(jobs), str(work / "ids.pt"), str(work / "out.pt")],
        check=True,
    )
    return torch.load(work / "out.pt")


def _reference_logits(checkpoint: Path, plan: ModelPlan, input_ids: torch.Tensor) -> torch.Tensor:
    """The original model, routing only to the experts the plan keeps."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    adapter = ADAPTERS[model.config.model_type]
    allowed = {}
    for lp in plan.layers:
        mask = torch.zeros(lp.num_experts_before, dtype=torch.bool)
        mask[lp.kept] = True
        allowed[lp.layer] = mask
    with torch.no_grad(), restricted_routing(model, adapter, allowed, top_k=plan.top_k):
        return model(input_ids).logits


@pytest.mark.parametrize("name", FAMILIES + [f"{f}-top1" for f in TOP_K_FAMILIES])
def test_reload_is_clean_and_equals_the_masked_original(name, checkpoints, pruned, reloaded, input_ids):
    family = name.removesuffix("-top1")
    result = reloaded[name]
    assert result["missing"] == [] and result["unexpected"] == [] and result["mismatched"] == []
    plan = ModelPlan.load(pruned[name] / PLAN_FILENAME)
    top_k = 1 if name.endswith("-top1") else 2
    assert plan.top_k == top_k
    assert set(result["experts"]) == {KEEP[family]}
    assert set(result["router_top_k"]) == {top_k} and result["config_top_k"] == top_k
    reference = _reference_logits(checkpoints[family], plan, input_ids)
    torch.testing.assert_close(result["logits"], reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_holds_every_expert_count_alias(family, pruned):
    config = json.loads((pruned[family] / "config.json").read_text())
    for key in ADAPTERS[family].expert_count_keys:
        assert config[key] == KEEP[family]
    assert (pruned[family] / "README.md").is_file() and (pruned[family] / "tokenizer.json").is_file()


def test_top_k_change_alters_the_output(reloaded):
    a, b = reloaded["mixtral"]["logits"], reloaded["mixtral-top1"]["logits"]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_plan_reapplied_gives_an_identical_checkpoint(family, checkpoints, pruned, tmp_path):
    out = tmp_path / "again"
    moeshrink.apply_plan(checkpoints[family], pruned[family] / PLAN_FILENAME, out)
    first, second = load_file(pruned[family] / "model.safetensors"), load_file(out / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (pruned[family] / "config.json").read_text()
    )
    assert ModelPlan.load(out / PLAN_FILENAME).layers == ModelPlan.load(pruned[family] / PLAN_FILENAME).layers
