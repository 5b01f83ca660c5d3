"""Sparsity building blocks: Wanda / magnitude / N:M masks, OWL ratios, exact zero accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeshrink.arch.base import ExpertTensor, MoELayer
from moeshrink.errors import MoeShrinkError
from moeshrink.sparsity import (
    bitmask_bytes,
    compressed_bytes,
    count_sparsity,
    input_sq_norm,
    linear_view,
    magnitude_scores,
    nm_mask,
    outlier_fraction,
    owl_ratios,
    unstructured_mask,
    validate_sparsity,
    wanda_scores,
)

# --- Wanda on a hand-computed 2x4 layer ------------------------------------------------------------


def test_wanda_hand_example():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [-5.0, 6.0, -0.5, 1.0]])
    # Two tokens; per column sum of squares = [4, 1, 0.25, 16], so ||X_j|| = [2, 1, 0.5, 4].
    x = torch.tensor([[2.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 4.0]])
    norm = input_sq_norm(x)
    assert torch.equal(norm, torch.tensor([4.0, 1.0, 0.25, 16.0]))
    scores = wanda_scores(w, norm)
    # row 0: 1*2, 2*1, 3*0.5, 4*4;  row 1: 5*2, 6*1, 0.5*0.5, 1*4
    assert torch.equal(scores, torch.tensor([[2.0, 2.0, 1.5, 16.0], [10.0, 6.0, 0.25, 4.0]]))
    mask = unstructured_mask(scores, 0.5)
    # row 0 prunes 1.5 (col 2) and, of the tie 2 = 2, the higher index (col 1); row 1 prunes cols 2, 3.
    assert mask.tolist() == [[True, False, False, True], [True, True, False, False]]
    # Magnitude alone would prune row 0's cols 0 and 1 instead: the input norms change the choice.
    assert unstructured_mask(magnitude_scores(w), 0.5).tolist() == [
        [False, False, True, True],
        [True, True, False, False],
    ]


def test_wanda_rejects_mismatched_norm():
    with pytest.raises(ValueError, match="input columns"):
        wanda_scores(torch.ones(2, 4), torch.ones(3))


# --- unstructured and N:M masks --------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_unstructured_per_row_counts(sparsity):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(7, 20, generator=g)
    mask = unstructured_mask(scores, sparsity)
    pruned = (~mask).sum(dim=1)
    assert torch.all(pruned == round(sparsity * 20))
    # Every kept score in a row is >= every pruned score of that row.
    for row, keep in zip(scores, mask, strict=True):
        if (~keep).any() and keep.any():
            assert row[keep].min() >= row[~keep].max()


def test_unstructured_global_and_ties():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [9.0, 9.0, 0.0, 0.5]])
    mask = unstructured_mask(scores, 0.5, per_row=False)
    assert (~mask).sum() == 4
    # Global: 0.0 and 0.5 go first, then two of the four tied 1.0s, the higher indices first.
    assert mask.tolist() == [[True, True, False, False], [True, True, False, False]]
    # Deterministic: the same tied scores give the same mask every time.
    assert torch.equal(unstructured_mask(torch.ones(3, 8), 0.25), unstructured_mask(torch.ones(3, 8), 0.25))


def test_nm_pattern_holds_in_every_group():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 32, generator=g).abs()
    mask = nm_mask(scores, 2, 4)
    groups = mask.reshape(6, 8, 4)
    assert torch.all(groups.sum(dim=2) == 2)
    s = scores.reshape(6, 8, 4)
    kept_min = torch.where(groups, s, torch.inf).amin(dim=2)
    pruned_max = torch.where(groups, -torch.inf, s).amax(dim=2)
    assert torch.all(kept_min >= pruned_max)
    assert torch.all(nm_mask(scores, 1, 8).reshape(6, 4, 8).sum(dim=2) == 1)


def test_nm_bad_shape_and_pattern_raise():
    with pytest.raises(MoeShrinkError, match=r"divisible by 4.*\[3, 10\]"):
        nm_mask(torch.ones(3, 10), 2, 4)
    with pytest.raises(MoeShrinkError, match="N:M"):
        nm_mask(torch.ones(3, 8), 5, 4)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity_raises(bad):
    with pytest.raises(MoeShrinkError, match=r"must be .*\[0, 1\)"):
        validate_sparsity(bad)
    with pytest.raises(MoeShrinkError):
        unstructured_mask(torch.ones(2, 4), bad)


def test_bad_sparsity_message_is_one_line():
    with pytest.raises(MoeShrinkError) as info:
        validate_sparsity(1.0, "total sparsity")
    assert str(info.value).startswith("total sparsity must be in [0, 1): got 1.0")
    assert "\n" not in str(info.value)


# --- OWL -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.5, 0.7, 0.03, 0.97])
def test_owl_ratios_mean_bounds_order(target):
    fractions = [0.01, 0.05, 0.03, 0.2, 0.002]
    lam = 0.08
    ratios = owl_ratios(fractions, target, lam)
    assert sum(ratios) / len(ratios) == pytest.approx(target, abs=1e-12)
    assert all(target - lam - 1e-12 <= r <= target + lam + 1e-12 for r in ratios)
    assert all(0.0 <= r < 1.0 for r in ratios)
    # More outliers -> lower sparsity: strictly inverse order.
    by_fraction = sorted(range(len(fractions)), key=lambda i: fractions[i])
    assert [ratios[i] for i in by_fraction] == sorted(ratios, reverse=True)
    assert len(set(ratios)) == len(ratios)


def test_owl_ratios_full_spread_and_degenerate():
    # Symmetric fractions: the extremes sit exactly at target -/+ lam, as in OWL.
    ratios = owl_ratios([0.0, 0.1, 0.2], 0.5, 0.08)
    assert ratios == pytest.approx([0.58, 0.5, 0.42])
    assert owl_ratios([0.1, 0.1], 0.6) == [0.6, 0.6]
    assert owl_ratios([0.3], 0.4) == [0.4]
    with pytest.raises(MoeShrinkError):
        owl_ratios([0.1, 0.2], 1.0)


def test_outlier_fraction_constructed():
    scores = torch.tensor([1.0] * 9 + [100.0])  # mean 10.9, threshold 54.5: one outlier of ten
    assert outlier_fraction(scores) == pytest.approx(0.1)
    assert outlier_fraction(scores, m=10.0) == 0.0  # threshold 109
    # A sequence of tensors is one layer: same answer as the concatenation.
    assert outlier_fraction([scores[:4].reshape(2, 2), scores[4:]]) == pytest.approx(0.1)
    assert outlier_fraction(torch.ones(4, 4)) == 0.0


# --- linear views of fused expert tensors ----------------------------------------------------------


def _layer(tensors: dict[str, torch.Tensor], specs: tuple[ExpertTensor, ...]) -> MoELayer:
    experts = nn.Module()
    for name, value in tensors.items():
        experts.register_parameter(name, nn.Parameter(value.clone()))
    return MoELayer(
        index=0,
        block=nn.Module(),
        router=nn.Linear(3, 2, bias=False),
        experts=experts,
        expert_tensors=specs,
        scoring=lambda router, logits, allowed: (logits, logits),
        probabilities=lambda logits: logits,
    )


def test_linear_view_both_layouts():
    g = torch.Generator().manual_seed(2)
    gate_up = torch.randn(2, 4, 3, generator=g)  # [E, 2I, H], I = 2, H = 3
    down = torch.randn(2, 3, 2, generator=g)  # [E, H, I]
    mixtral = _layer(
        {"gate_up_proj": gate_up, "down_proj": down},
        (ExpertTensor("gate_up_proj", 0, "halves"), ExpertTensor("down_proj", 1, "plain")),
    )
    gpt_oss = _layer(
        {
            "gate_up_proj": gate_up.transpose(1, 2),
            "gate_up_proj_bias": torch.zeros(2, 4),
            "down_proj": down.transpose(1, 2),
        },
        (
            ExpertTensor("gate_up_proj", 1, "interleaved"),
            ExpertTensor("gate_up_proj_bias", 0, "interleaved"),
            ExpertTensor("down_proj", 0, "plain"),
        ),
    )
    for name, ref in (("gate_up_proj", gate_up), ("down_proj", down)):
        view, transposed = linear_view(mixtral, name, 1)
        assert not transposed and torch.equal(view, ref[1])
        view, transposed = linear_view(gpt_oss, name, 1)
        assert transposed and torch.equal(view, ref[1])
    # The view writes through to the parameter: masking it prunes the stored (transposed) weight.
    view, _ = linear_view(gpt_oss, "down_proj", 1)
    view.mul_(nm_mask(magnitude_scores(view), 1, 2))
    stored = gpt_oss.param("down_proj").detach()[1]
    assert int((stored == 0).sum()) == 3 and torch.equal(stored.t(), view)
    assert int((gpt_oss.param("down_proj").detach()[0] == 0).sum()) == 0
    with pytest.raises(ValueError, match="biases are never pruned"):
        linear_view(gpt_oss, "gate_up_proj_bias", 0)


# --- accounting ------------------------------------------------------------------------------------


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.ones(2, 4, 3))  # 24
        self.down_proj = nn.Parameter(torch.ones(2, 3, 2))  # 12


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.experts = _Experts()
        self.mlp.shared_experts = nn.Linear(3, 3, bias=False)  # 9, not a routed expert


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)  # 15
        self.layers = nn.ModuleList([_Block(), _Block()])


def test_count_sparsity_exact():
    model = _Model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        model.embed.weight[0] = 0.0  # 3 zeros, no layer
        model.layers[0].mlp.experts.gate_up_proj[0, :2] = 0.0  # 6 zeros
        model.layers[0].mlp.experts.down_proj[1, 0, 0] = -0.0  # 1 zero (negative zero counts)
        model.layers[1].mlp.experts.down_proj[:] = 0.0  # 12 zeros
        model.layers[1].mlp.shared_experts.weight[0, 0] = 0.0  # 1 zero, not expert
        model.layers[1].mlp.experts.gate_up_proj[1, 0, 0] = 1e-30  # tiny but not zero
    report = count_sparsity(model)
    assert report.tensor("embed.weight").zeros == 3 and report.tensor("embed.weight").layer is None
    t = report.tensor("layers.0.mlp.experts.gate_up_proj")
    assert (t.total, t.zeros, t.layer, t.expert) == (24, 6, 0, True)
    assert report.tensor("layers.0.mlp.experts.down_proj").zeros == 1
    assert report.tensor("layers.1.mlp.experts.gate_up_proj").zeros == 0
    assert not report.tensor("layers.1.mlp.shared_experts.weight").expert
    assert (report.layers[0].total, report.layers[0].zeros) == (45, 7)
    assert (report.layers[1].total, report.layers[1].zeros) == (45, 13)
    assert (report.experts.total, report.experts.zeros) == (72, 19)
    assert (report.all.total, report.all.zeros) == (105, 23)
    assert report.fraction == pytest.approx(23 / 105)
    assert report.expert_fraction == pytest.approx(19 / 72)
    assert report.all.dense_bytes == 105 * 4
    # Explicit expert set overrides the default name rule.
    only = count_sparsity(model, {"layers.1.mlp.experts.down_proj"})
    assert (only.experts.total, only.experts.zeros) == (12, 12)
    d = report.to_dict()
    assert d["all"]["zeros"] == 23 and d["layers"]["1"]["zeros"] == 13 and len(d["tensors"]) == 7
    text = report.to_text()
    assert "23 of 105" in text and "19 of 72" in text and "no memory" in text


def test_compressed_bytes_hand_example():
    # 10 entries, 6 zeros, 2-byte values: 4 non-zeros.
    assert compressed_bytes(10, 6, 2) == 4 * 2 + 4 * 2  # 16-bit index each
    assert compressed_bytes(10, 6, 2, index_bits=2) == 8 + 1  # 2:4-style metadata, 8 bits -> 1 byte
    assert bitmask_bytes(10, 6, 2) == 8 + 2  # 10 mask bits -> 2 bytes
    assert compressed_bytes(10, 0, 2) == 40 > 20  # no zeros: compression costs more than dense
    with pytest.raises(ValueError):
        compressed_bytes(10, 11, 2)
