"""REAP: score_j = mean over tokens routed to j of g_j(x) * ||E_j(x)||, g from the family's own router.

As published, the mean runs only over the tokens an expert received, so a rarely-routed expert with
large outputs can outrank a busy one (see DESIGN.md, "Lessons"); ``ean`` weighs traffic instead.
"""

from __future__ import annotations

import torch

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import EXPERT_NORMS, LayerStats
from moeshrink.methods.base import ScorePruning


class REAPPruning(ScorePruning):
    name = "reap"
    needs = frozenset({EXPERT_NORMS})

    def score(self, layer: MoELayer, stats: LayerStats | None) -> torch.Tensor:
        return stats.gated_norm_sum / stats.counts.clamp(min=1)
