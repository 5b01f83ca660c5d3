"""Merging methods: clusters are real partitions, the algorithms find planted structure, and merged
checkpoints reload in a fresh process with the in-memory logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import moeshrink
from moeshrink.calib.observers import LayerStats
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
    m = get_method("hcsmoe")
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
    routed = torch.isin(_Layer.route(stats.logits)[1], torch.tensor(members)).any(1)  # the tokens it is fitted on
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
        ("qwen2_moe", "msmoe", {}),
        ("deepseek_v3", "hcsmoe", {"router": "logsumexp"}),
        ("gpt_oss", "uncurl", {}),
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
