"""Frequency pruning: keep the experts the router selects most often on the calibration tokens."""

from __future__ import annotations

import torch

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import COUNTS, LayerStats
from moeshrink.methods.base import ScorePruning


class FrequencyPruning(ScorePruning):
    name = "frequency"
    needs = frozenset({COUNTS})

    def score(self, layer: MoELayer, stats: LayerStats | None) -> torch.Tensor:
        return stats.counts
