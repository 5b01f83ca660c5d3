"""What an expert-level method is: statistics it needs in, a :class:`LayerPlan` out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import COUNTS, LayerStats
from moeshrink.methods.budget import allocate_global
from moeshrink.methods.options import MethodOptions
from moeshrink.plan import LayerPlan
from moeshrink.surgery import apply_layer_plan


@dataclass(frozen=True)
class LayerBudget:
    """How many experts a layer keeps, the top-k after compression, and the routing groups to respect."""

    keep: int
    top_k: int
    groups: int = 1


class ExpertMethod(ABC):
    """One expert-level method. ``needs`` names the statistics (see ``engine.observers``) it reads;
    a method that needs none is planned without any forward pass.

    A method declares its options once, as a nested ``class Options(MethodOptions)``; the validated
    settings are ``self.settings`` (immutable: a changed setting is a new method, :meth:`with_options`)."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    # Statistics of the unmodified model read by allocate_global (one pass before compression).
    global_needs: ClassVar[frozenset[str]] = frozenset({COUNTS})
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, seed: int = 0, **options: Any):
        self.seed = seed
        self.settings = self.Options.parse(self.name, options)

    @property
    def options(self) -> dict[str, Any]:
        """The settings recorded in the plan: the seed, then the declared options."""
        return {"seed": self.seed, **self.settings.recorded()}

    def with_options(self, **changes: Any) -> ExpertMethod:
        """A copy of this method with some options changed, validated like the user's (``self`` is left
        as it was)."""
        current = {name: getattr(self.settings, name) for name in type(self.settings).model_fields}
        return type(self)(seed=self.seed, **(current | changes))

    @abstractmethod
    def plan_layer(self, layer: MoELayer, stats: LayerStats | None, budget: LayerBudget) -> LayerPlan:
        """Decide the new experts of ``layer``."""

    def allocate_global(
        self, layers: dict[int, MoELayer], stats: dict[int, LayerStats], total: int, minimum: int, groups: int
    ) -> tuple[dict[int, int], ExpertMethod]:
        """Experts kept per layer under a global budget of ``total``, and the method to plan the layers
        with: by default shared out by usage (:func:`moeshrink.methods.budget.allocate_global`) and
        ``self``; ``stats`` holds ``global_needs``. A method that finds a setting here (STUN's shared
        threshold) returns a copy carrying it, never changing ``self``."""
        return allocate_global({i: s.counts for i, s in stats.items()}, total, minimum, groups), self

    def compress(self, layer: MoELayer, stats: LayerStats | None, budget: LayerBudget) -> LayerPlan:
        """Plan ``layer`` and apply the plan (a method that refines weights after surgery extends this)."""
        plan = self.plan_layer(layer, stats, budget)
        apply_layer_plan(layer, plan)
        return plan


def top_scores(scores: torch.Tensor, keep: int, groups: int = 1) -> list[int]:
    """Indices of the ``keep`` largest scores (ties to the lower index); with ``groups`` > 1 the same
    number is kept in each contiguous group, so group-limited routing still sees every group."""
    scores = scores.double().cpu()
    per_group, size = keep // groups, scores.numel() // groups
    kept: list[int] = []
    for g in range(groups):
        part = scores[g * size : (g + 1) * size]
        order = sorted(range(size), key=lambda j: (-float(part[j]), j))
        kept.extend(g * size + j for j in order[:per_group])
    return sorted(kept)


class ScorePruning(ExpertMethod):
    """Keep the experts with the largest per-expert score; drop the rest."""

    @abstractmethod
    def score(self, layer: MoELayer, stats: LayerStats | None) -> torch.Tensor:
        """One score per expert, higher = more worth keeping."""

    def plan_layer(self, layer: MoELayer, stats: LayerStats | None, budget: LayerBudget) -> LayerPlan:
        scores = self.score(layer, stats)
        kept = top_scores(scores, budget.keep, budget.groups)
        return LayerPlan.keep(layer.index, layer.num_experts, kept, scores=[float(s) for s in scores])
