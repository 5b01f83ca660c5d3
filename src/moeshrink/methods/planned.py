"""An experts step whose layer plans were made elsewhere (an EEP search), so the steps that follow an
experts step in the layer loop (recovery) can run after a plan that no one-shot method made."""

from __future__ import annotations

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import LayerStats
from moeshrink.methods.base import ExpertMethod, LayerBudget
from moeshrink.plan import LayerPlan, ModelPlan
from moeshrink.surgery.apply import apply_layer_plan, set_top_k, write_refit


class PlannedExperts(ExpertMethod):
    """Applies ``plan``'s layer plan to each MoE layer as it is (merges, re-fitted tensors and per-layer
    top-k included), exactly as :func:`moeshrink.surgery.apply_model_plan` would. Not a method a user
    names: the plan's own method is what the output records."""

    name = "planned"

    def __init__(self, plan: ModelPlan):
        super().__init__(seed=0)
        self.plan = plan
        self.by_layer = {lp.layer: lp for lp in plan.layers}

    def plan_layer(self, layer: MoELayer, stats: LayerStats | None, budget: LayerBudget) -> LayerPlan:
        return self.by_layer[layer.index]

    def compress(self, layer: MoELayer, stats: LayerStats | None, budget: LayerBudget) -> LayerPlan:
        plan = self.plan_layer(layer, stats, budget)
        apply_layer_plan(layer, plan)
        write_refit(layer, plan)
        set_top_k(layer, plan.top_k or self.plan.top_k)
        return plan
