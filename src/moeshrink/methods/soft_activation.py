"""Soft-activation pruning: keep the experts with the largest router probability mass over all tokens."""

from __future__ import annotations

import torch

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import SOFT_MASS, LayerStats
from moeshrink.methods.base import ScorePruning


class SoftActivationPruning(ScorePruning):
    name = "soft_activation"
    needs = frozenset({SOFT_MASS})

    def score(self, layer: MoELayer, stats: LayerStats | None) -> torch.Tensor:
        return stats.soft_mass
