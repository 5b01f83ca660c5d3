"""EAN (expert activation norm): score_j = sum over tokens routed to j of ||E_j(x)||.

A sum, not a mean: an expert scores high when it carries much traffic with large outputs.
"""

from __future__ import annotations

import torch

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import EXPERT_NORMS, LayerStats
from moeshrink.methods.base import ScorePruning


class EANPruning(ScorePruning):
    name = "ean"
    needs = frozenset({EXPERT_NORMS})

    def score(self, layer: MoELayer, stats: LayerStats | None) -> torch.Tensor:
        return stats.norm_sum
