"""Pruning masks for individual weights inside experts: magnitude, Wanda, N:M, OWL layer ratios.

Convention: a weight matrix is ``W [out, in]`` as in ``nn.Linear`` (one row per output feature, one
column per input feature). :func:`linear_view` gives that view of one expert's fused tensor whatever
the family's storage layout. A mask is a bool tensor shaped like the scores, ``True`` = keep.
Ties between equal scores are broken by index: the lower input index ranks higher (is kept first),
so masks are deterministic. Biases are never pruned.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from moeshrink.arch.base import MoELayer
from moeshrink.errors import MoeShrinkError


def validate_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Return ``sparsity`` as a float, or raise :class:`MoeShrinkError` unless ``0 <= sparsity < 1``.

    1.0 would zero every weight (a dead model), so it is refused like values outside the range.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise MoeShrinkError(
            f"{what} must be a number in [0, 1): got {sparsity!r}; give the fraction of weights to zero, "
            "e.g. 0.5"
        )
    value = float(sparsity)
    if not 0.0 <= value < 1.0:  # also False for NaN
        raise MoeShrinkError(
            f"{what} must be in [0, 1): got {sparsity!r}; give the fraction of weights to zero, e.g. 0.5"
        )
    return value


def linear_view(layer: MoELayer, name: str, expert: int) -> tuple[torch.Tensor, bool]:
    """One expert's weight ``name`` as an ``[out, in]`` view, and whether storage holds it transposed.

    The view shares storage with the parameter (detached), so ``view.mul_(mask)`` prunes in place.
    Projections into the intermediate space (``gate_up_proj``, ...) have the neuron axis as output;
    ``down_*`` projections have it as input. Mixtral-style ``gate_up_proj [2I, H]`` and
    ``down_proj [H, I]`` are already ``[out, in]``; GPT-OSS stores both transposed.
    """
    spec = next((t for t in layer.expert_tensors if t.name == name), None)
    if spec is None:
        raise ValueError(f"layer {layer.index}: no expert tensor named {name!r}")
    weight = layer.param(name).detach()[expert]
    if spec.neuron_dim is None or weight.dim() != 2:
        raise ValueError(
            f"layer {layer.index}: expert tensor {name!r} of shape {list(weight.shape)} is not a weight "
            "matrix (biases are never pruned)"
        )
    neuron_is_output = not name.startswith("down")
    transposed = (spec.neuron_dim == 0) != neuron_is_output
    return (weight.t() if transposed else weight), transposed


def _check_matrix(scores: torch.Tensor, what: str) -> None:
    if scores.dim() != 2:
        raise ValueError(f"{what} needs a 2-D [out, in] matrix: got shape {list(scores.shape)}")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32: the magnitude-pruning importance of each weight."""
    return weight.detach().float().abs()


def input_sq_norm(inputs: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of each input feature squared, ``[T, in] -> [in]`` (float32), for Wanda.

    Sums from several batches of the tokens routed to one expert add up to the same statistic.
    """
    x = inputs.detach().float().reshape(-1, inputs.shape[-1])
    return (x * x).sum(dim=0)


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``|W_ij| * ||X_j||_2`` (float32), ``X`` = the inputs this matrix saw.

    ``input_sq_norm [in]`` is the sum over tokens of ``x_j^2`` (see :func:`input_sq_norm`): for an
    expert, only the tokens routed to it. Weights on inputs that are large in practice rank higher.
    """
    _check_matrix(weight, "wanda_scores")
    if input_sq_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"wanda_scores: input_sq_norm of shape {list(input_sq_norm.shape)} does not match the "
            f"{weight.shape[1]} input columns of a weight of shape {list(weight.shape)}"
        )
    norm = input_sq_norm.detach().to(device=weight.device, dtype=torch.float32).clamp_min(0).sqrt()
    return magnitude_scores(weight) * norm[None, :]


def _keep_top(scores: torch.Tensor, keep: int, dim: int) -> torch.Tensor:
    """Mask keeping the ``keep`` highest scores along ``dim`` (lower index wins ties)."""
    order = torch.sort(scores, dim=dim, descending=True, stable=True).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(dim, order.narrow(dim, 0, keep), True)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Keep-mask pruning the lowest scores: ``round(sparsity * in)`` per output row (Wanda's
    comparison group), or ``round(sparsity * numel)`` over the whole matrix when ``per_row=False``."""
    sparsity = validate_sparsity(sparsity)
    if per_row:
        _check_matrix(scores, "unstructured_mask(per_row=True)")
        cols = scores.shape[1]
        return _keep_top(scores, cols - round(sparsity * cols), dim=1)
    flat = scores.reshape(-1)
    return _keep_top(flat, flat.numel() - round(sparsity * flat.numel()), dim=0).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M keep-mask: in each group of ``m`` consecutive input weights of each row keep the ``n``
    highest scores (2:4 is the pattern sparse tensor cores accelerate)."""
    _check_matrix(scores, "nm_mask")
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
        raise MoeShrinkError(f"N:M sparsity needs integers 0 <= N <= M, M >= 1: got {n}:{m}; use e.g. 2:4")
    rows, cols = scores.shape
    if cols % m:
        raise MoeShrinkError(
            f"N:M sparsity {n}:{m} needs the input dimension divisible by {m}: got a weight of shape "
            f"[{rows}, {cols}]; choose an M that divides {cols} or use unstructured sparsity"
        )
    groups = scores.reshape(rows, cols // m, m)
    return _keep_top(groups, n, dim=2).reshape(rows, cols)


def outlier_fraction(scores: torch.Tensor | Sequence[torch.Tensor], m: float = 5.0) -> float:
    """OWL's layer-wise outlier distribution: the fraction of scores above ``m`` times their mean.

    Pass one layer's scores (e.g. Wanda scores of all its expert matrices) as one tensor or a
    sequence; a sequence is not concatenated, so a whole layer never needs a second copy in memory.
    """
    parts = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    count = sum(p.numel() for p in parts)
    if count == 0:
        raise ValueError("outlier_fraction: no scores given")
    mean = sum(float(p.detach().double().sum()) for p in parts) / count
    threshold = m * mean
    outliers = sum(int((p.detach().double() > threshold).sum()) for p in parts)
    return outliers / count


# OWL's lambda: the paper's 0.08 lost to every smaller value tried on the testbed's validation split
# at 55% total sparsity; 0.02 was the best above 0 (docs/defaults.md).
OWL_LAMBDA = 0.02


def owl_ratios(outlier_fractions: Sequence[float], target: float, lam: float = OWL_LAMBDA) -> list[float]:
    """OWL layer-wise sparsity: layers with more outliers get less sparsity, the mean stays ``target``.

    Outlier fractions ``D`` are min-max normalised, centred to mean 0 and scaled so the farthest layer
    is ``lam`` from ``target``: ``ratio_l = target - lam * c_l / max|c|`` with
    ``c = (D - min)/(max - min) - mean``. So every ratio lies in ``[target - lam, target + lam]``
    (OWL's stated bound; its code can overshoot it when D is skewed) and the mean is ``target``. Near 0
    or 1 the spread shrinks (to ``min(target, (1 - target)/2)``) instead of clipping, so ratios stay in
    ``[0, 1)`` and the mean stays exact. Equal fractions give ``target`` everywhere.
    """
    target = validate_sparsity(target, "target sparsity")
    if not outlier_fractions:
        raise ValueError("owl_ratios: no layers given")
    if not (math.isfinite(lam) and lam >= 0):
        raise MoeShrinkError(
            f"OWL lambda must be a finite number >= 0: got {lam!r}; the default is {OWL_LAMBDA}, OWL's paper 0.08"
        )
    d = torch.tensor([float(f) for f in outlier_fractions], dtype=torch.float64)
    spread = min(lam, target, (1.0 - target) / 2)
    low, high = float(d.min()), float(d.max())
    if high - low <= 0 or spread == 0:
        return [target] * d.numel()
    c = (d - low) / (high - low)
    c = c - c.mean()
    ratios = target - spread * c / c.abs().max()
    ratios = ratios - (ratios.mean() - target)  # remove float round-off so the mean is exact
    return [float(r) for r in ratios.clamp(0.0, 1.0 - 1e-12)]
