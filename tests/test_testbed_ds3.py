"""The shipped second testbed, moeshrink-tiny-ds3: DeepSeek-V3's shape as trained, and a prune of it
that verifies."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moeshrink
from moeshrink.errors import MoeShrinkError
from moeshrink.info import describe_model
from moeshrink.io.checkpoint import load_model
from moeshrink.testbed import paths
from moeshrink.testbed.paths import TESTBEDS, corpus_dir

DS3 = "moeshrink-tiny-ds3"


def test_the_testbeds_are_named_and_the_default_is_the_mixtral_one():
    assert TESTBEDS == ("moeshrink-tiny", DS3)
    assert paths.testbed_model_dir() == paths.testbed_model_dir("moeshrink-tiny")
    assert paths.testbed_model_dir(DS3).name == DS3
    with pytest.raises(
        MoeShrinkError, match="no testbed named 'tiny': the shipped testbeds are moeshrink-tiny"
    ):
        paths.testbed_model_dir("tiny")


def test_ds3_testbed_is_deepseek_v3_shaped_with_its_router_in_float32():
    path = paths.testbed_model_dir(DS3)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["model_type"] == "deepseek_v3"
    assert (config["n_routed_experts"], config["num_experts_per_tok"]) == (64, 6)
    assert (config["n_group"], config["topk_group"], config["n_shared_experts"]) == (4, 2, 1)
    assert config["first_k_dense_replace"] == 1
    with safe_open(path / "model.safetensors", "pt") as f:
        dtypes = {name: str(f.get_slice(name).get_dtype()) for name in f.keys()}
    routers = {n: d for n, d in dtypes.items() if ".mlp.gate." in n}
    moe_layers = range(1, config["num_hidden_layers"])
    assert set(routers) == {
        f"model.layers.{i}.mlp.gate.{t}" for i in moe_layers for t in ("weight", "e_score_correction_bias")
    }
    assert set(routers.values()) == {"F32"}
    assert {d for n, d in dtypes.items() if n not in routers} == {"BF16"}
    assert "model.layers.0.mlp.gate_proj.weight" in dtypes  # the dense first layer
    record = json.loads((path / "training_record.json").read_text())
    assert record["model"] == DS3 and record["settings"]["shape"] == "deepseek_v3"


def test_ds3_testbed_loads_in_transformers_and_moeshrink_alike():
    path = paths.testbed_model_dir(DS3)
    loaded = load_model(path)
    info = describe_model(loaded.model, loaded.adapter)
    assert info.family == "deepseek_v3" and info.moe_layers == [1, 2, 3]
    assert info.experts_per_layer == [64] * 3 and info.top_k == 6 and info.shared_expert_parameters > 0
    # moeshrink computes the experts one by one (eager), as transformers does when asked to
    plain = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    ids = loaded.tokenizer("In the beginning God created the heaven", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = loaded.model(input_ids=ids).logits, plain(input_ids=ids).logits
    torch.testing.assert_close(ours.float(), theirs.float())
    gate = plain.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert gate.e_score_correction_bias.abs().max() > 0  # balanced during training


def test_ds3_testbed_prunes_to_32_experts_and_verifies(tmp_path):
    out = tmp_path / "ds3-32"
    result = moeshrink.prune(
        paths.testbed_model_dir(DS3),
        "frequency",
        keep=32,
        calib=corpus_dir() / "bible" / "calib.jsonl",
        samples=8,
        seq_len=64,
        output=out,
        verify=True,
        progress=False,
    )
    assert result.plan.verification["transformers"]["status"] == "pass"
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == 32 and config["n_group"] == 4
    with safe_open(out / "model.safetensors", "pt") as f:
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and bias.shape == (32,)
