"""Random pruning (seeded): the floor every method must beat."""

from __future__ import annotations

import torch

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import LayerStats
from moeshrink.methods.base import ScorePruning


class RandomPruning(ScorePruning):
    name = "random"

    def score(self, layer: MoELayer, stats: LayerStats | None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100003 + layer.index)
        return torch.rand(layer.num_experts, generator=generator)
