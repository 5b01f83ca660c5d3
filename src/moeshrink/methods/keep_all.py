"""``none``: keep every expert. For runs that only sparsify inside experts or only lower top-k."""

from __future__ import annotations

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import LayerStats
from moeshrink.methods.base import ExpertMethod, LayerBudget
from moeshrink.plan import LayerPlan


class KeepAll(ExpertMethod):
    name = "none"

    def plan_layer(self, layer: MoELayer, stats: LayerStats | None, budget: LayerBudget) -> LayerPlan:
        return LayerPlan.keep(layer.index, layer.num_experts, list(range(layer.num_experts)))
