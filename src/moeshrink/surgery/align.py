"""Neuron alignment of experts before they are merged.

The intermediate neurons of a SwiGLU expert can be permuted (a gate row, an up row and a down
column moved together, plus their biases) without changing what the expert computes, so two
experts trained apart need not list "the same" neuron at the same index. Averaging them slot by
slot then mixes unrelated neurons. Before expert ``member`` is averaged into ``anchor`` we
therefore look for the permutation of ``member``'s neurons that best matches ``anchor``'s, as a
linear assignment problem (``scipy.optimize.linear_sum_assignment``) on a neuron-by-neuron
similarity matrix:

* :func:`weight_matching` compares the neurons' weights (:meth:`MoELayer.neuron_features`) by
  their raw inner product. Since a permutation leaves the total squared norm unchanged, maximising
  the summed inner products is exactly minimising the Frobenius distance between the anchor and
  the permuted member, i.e. it makes the merged average as close as possible to both. (Cosine
  similarity would ignore neuron scale, which matters for an average.)
* :func:`activation_matching` compares what the neurons compute on calibration hidden states: the
  Pearson correlation over tokens of their intermediate activations (the input of the down
  projection). Dead neurons (zero variance) correlate 0 with everything.

A returned ``perm`` uses the convention of :class:`~moeshrink.plan.NewExpert.permutations`: new
neuron ``i`` of the permuted member is its old neuron ``perm[i]``, so it goes into the plan as is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moeshrink.arch import MoELayer
from moeshrink.errors import MoeShrinkError

AlignMethod = Literal["weight", "activation"]


def _assign(similarity: torch.Tensor) -> list[int]:
    """perm maximising sum_i similarity[i, perm[i]] (rows: anchor neurons, columns: member neurons)."""
    sim = similarity.detach().double().cpu().numpy()
    if not np.isfinite(sim).all():
        sim = np.nan_to_num(sim, nan=0.0, posinf=0.0, neginf=0.0)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    perm = np.empty(sim.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm.tolist()


def _standardized(acts: torch.Tensor) -> torch.Tensor:
    """Columns centred and scaled to unit norm (float64); zero-variance columns stay all zero."""
    acts = acts.double()
    centred = acts - acts.mean(dim=0, keepdim=True)
    norm = centred.norm(dim=0, keepdim=True)
    return torch.where(norm > 0, centred / norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def _weight_perm(anchor_features: torch.Tensor, member_features: torch.Tensor) -> list[int]:
    return _assign(anchor_features.double() @ member_features.double().T)


def _activation_perm(anchor_std: torch.Tensor, member_std: torch.Tensor) -> list[int]:
    return _assign(anchor_std.T @ member_std)  # [I, I] Pearson correlations


def weight_matching(layer: MoELayer, anchor: int, member: int) -> list[int]:
    """Permutation of ``member``'s neurons that best matches ``anchor``'s by weights.

    Maximises ``sum_i <f_anchor[i], f_member[perm[i]]>`` over the concatenated neuron features,
    which is the same as minimising ``||F_anchor - F_member[perm]||_F``.
    """
    return _weight_perm(layer.neuron_features(anchor), layer.neuron_features(member))


def activation_matching(layer: MoELayer, anchor: int, member: int, hidden: torch.Tensor) -> list[int]:
    """Permutation of ``member``'s neurons that best matches ``anchor``'s by the Pearson correlation,
    over the tokens of ``hidden`` [T, H], of their intermediate activations."""
    return _activation_perm(
        _standardized(layer.intermediate(hidden, anchor)), _standardized(layer.intermediate(hidden, member))
    )


def align_to_anchor(
    layer: MoELayer,
    anchor: int,
    members: Iterable[int],
    *,
    hidden: torch.Tensor | None = None,
    method: AlignMethod = "weight",
) -> dict[int, list[int] | None]:
    """The permutation aligning each of ``members`` to ``anchor`` (the anchor itself maps to ``None``,
    the identity). ``method="activation"`` needs calibration ``hidden`` states [T, H] routed to the layer.
    """
    out: dict[int, list[int] | None] = {anchor: None}
    members = [m for m in members if m != anchor]
    if method == "weight":
        ref = layer.neuron_features(anchor)
        for m in members:
            out[m] = _weight_perm(ref, layer.neuron_features(m))
    elif method == "activation":
        if hidden is None or hidden.shape[0] < 2:
            raise MoeShrinkError(
                f"layer {layer.index}: activation matching needs calibration hidden states (at least 2 "
                "tokens); give some, or align by weights"
            )
        ref = _standardized(layer.intermediate(hidden, anchor))
        for m in members:
            out[m] = _activation_perm(ref, _standardized(layer.intermediate(hidden, m)))
    else:
        raise MoeShrinkError(f"unknown alignment method {method!r}: use 'weight' or 'activation'")
    return out
