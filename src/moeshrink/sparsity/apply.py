"""Unstructured or N:M sparsity inside the routed experts of one MoE layer.

Wanda scores each weight by |W_ij| * ||X_j||, with X the inputs of *that* expert: the hidden states
of the tokens routed to it for the gate/up projections, their intermediate activations for the down
projection. An expert that received no calibration tokens has no such norms and falls back to
magnitude, and the plan says which. Biases, routers and shared experts are left dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeshrink.arch import MoELayer
from moeshrink.calib.observers import INPUT_NORMS, LayerStats
from moeshrink.errors import MoeShrinkError
from moeshrink.sparsity.masks import (
    linear_view,
    magnitude_scores,
    nm_mask,
    unstructured_mask,
    validate_sparsity,
    wanda_scores,
)

SPARSITY_METHODS = ("wanda", "magnitude")


@dataclass(frozen=True)
class SparsitySpec:
    """What to zero inside the experts: a fraction per output row, or an N:M pattern."""

    sparsity: float
    method: str = "wanda"
    nm: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.method not in SPARSITY_METHODS:
            raise MoeShrinkError(
                f"sparsity method must be one of {', '.join(SPARSITY_METHODS)}, got {self.method!r}"
            )
        validate_sparsity(self.sparsity)

    @classmethod
    def parse(
        cls, sparsity: float | None, method: str = "wanda", nm: str | None = None
    ) -> SparsitySpec | None:
        """From the command-line form (``--sparsity 0.5`` or ``--nm 2:4``); None when neither is given."""
        if nm:
            try:
                n, m = (int(x) for x in nm.split(":"))
            except ValueError:
                raise MoeShrinkError(f"--nm takes N:M, e.g. 2:4, got {nm!r}") from None
            if not 0 < n < m:
                raise MoeShrinkError(f"--nm {nm}: need 0 < N < M, e.g. 2:4")
            return cls(sparsity=1 - n / m, method=method, nm=(n, m))
        return None if sparsity is None or sparsity == 0 else cls(sparsity=float(sparsity), method=method)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({INPUT_NORMS}) if self.method == "wanda" else frozenset()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "sparsity": self.sparsity, "nm": list(self.nm) if self.nm else None}


def _weight_names(layer: MoELayer) -> list[str]:
    return [t.name for t in layer.expert_tensors if t.layout != "none" and not t.name.endswith("_bias")]


@torch.no_grad()
def sparsify_layer(layer: MoELayer, stats: LayerStats | None, spec: SparsitySpec) -> dict[str, Any]:
    """Zero weights of every routed expert of ``layer`` in place; returns what was done (for the plan)."""
    fallback = []
    for expert in range(layer.num_experts):
        use_wanda = spec.method == "wanda" and stats is not None and float(stats.counts[expert]) > 0
        if spec.method == "wanda" and not use_wanda:
            fallback.append(expert)
        for name in _weight_names(layer):
            weight, _ = linear_view(layer, name, expert)
            if use_wanda:
                norms = stats.intermediate_sq[expert] if name.startswith("down") else stats.input_sq[expert]
                scores = wanda_scores(weight, norms.to(weight.device))
            else:
                scores = magnitude_scores(weight)
            mask = nm_mask(scores, *spec.nm) if spec.nm else unstructured_mask(scores, spec.sparsity)
            weight.mul_(mask.to(weight.dtype))
    return spec.to_dict() | {"magnitude_fallback_experts": fallback}
