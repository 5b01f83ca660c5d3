"""The testbed trainer, both shapes, a few steps on the shipped text (the real runs take ~40 min)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from moeshrink.testbed import train as trainer
from moeshrink.testbed.paths import DOMAINS, corpus_dir
from moeshrink.testbed.train import SHAPES, BiasBalancer, TrainSettings, train


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """The shipped splits, with calib standing in for train (the train split is not shipped)."""
    root = tmp_path_factory.mktemp("corpus")
    for domain in DOMAINS:
        (root / domain).mkdir()
        shutil.copy(corpus_dir() / domain / "calib.jsonl", root / domain / "train.jsonl")
        shutil.copy(corpus_dir() / domain / "test.jsonl", root / domain / "test.jsonl")
    return root


def _small(shape: str, **extra) -> TrainSettings:
    sizes = dict(steps=2, seq_len=32, sequences_per_domain=1, hidden_size=64, layers=2, warmup=1)
    return TrainSettings(shape=shape, **(SHAPES[shape] | sizes | extra))


def test_deepseek_v3_testbed_keeps_its_router_in_float32(small_corpus, tmp_path):
    record = train(small_corpus, tmp_path / "m", _small("deepseek_v3"), log_every=1)
    assert record["model"] == "moeshrink-tiny-ds3" and len(record["history"]) == 2
    assert all(entry["max_load_over_mean"] >= 1 for entry in record["history"])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["n_routed_experts"] == 64
    assert (
        config["num_experts_per_tok"] == 6 and config["n_group"] == 4 and config["first_k_dense_replace"] == 1
    )
    with safe_open(next((tmp_path / "m").glob("*.safetensors")), "pt") as f:
        dtypes = {name: str(f.get_slice(name).get_dtype()) for name in f.keys()}
    routers = {n: d for n, d in dtypes.items() if ".mlp.gate." in n}
    assert routers and set(routers.values()) == {"F32"}
    assert {d for n, d in dtypes.items() if n not in routers} == {"BF16"}


def test_bias_balancing_moves_each_bias_towards_the_mean_load():
    from transformers import AutoModelForCausalLM

    config = trainer.testbed_config(_small("deepseek_v3"), vocab_size=128, eos_id=0)
    model = AutoModelForCausalLM.from_config(config)
    balancer = BiasBalancer(model, rate=0.01)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(0)))
    loads = [load.clone() for load in balancer.loads]
    assert all(float(load.sum()) == 2 * 16 * 6 for load in loads)  # every token chose 6 experts
    balancer.step()
    for router, load in zip(balancer.routers, loads, strict=True):
        expected = 0.01 * torch.sign(load.mean() - load)
        assert torch.equal(router.e_score_correction_bias, expected)
    balancer.close()
