"""What the merging methods share: from clusters of experts to merged experts.

A merging method only decides the clusters. Each cluster becomes one new expert: its most-used
member is the anchor, the other members are (optionally) neuron-aligned to it, and the members are
averaged with weights proportional to how often the router chose them. The new router row is a
combination of the members' rows (``router``; default ``logsumexp``, chosen on the testbed's
validation split, docs/defaults.md: over 16 -> 8 and 16 -> 4 it served held-out text best for hcsmoe
and uncurl; for msmoe ``average`` was 0.3% better, inside the 1% a change of default must clear):

* ``average`` — the same frequency weights as the expert weights;
* ``anchor`` — the anchor's row alone;
* ``logsumexp`` — least-squares coefficients over the member rows so that the new logit tracks the
  cluster's total routing mass: log-sum-exp of the members' logits for softmax routers (the merged
  expert then receives the probability its members had together), the logit of the summed sigmoid
  scores for sigmoid routers; fitted on calibration tokens routed to any member.

With ``reconstruct`` (on by default: on the validation split it lowered perplexity for every merging
method, router and budget; docs/defaults.md) each merged expert's down projection is then re-fitted
by least squares.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from moeshrink.arch import MoELayer
from moeshrink.arch.routing import sigmoid_probabilities
from moeshrink.engine.observers import COUNTS, INPUTS, LOGITS, LayerStats
from moeshrink.methods.base import ExpertMethod, LayerBudget
from moeshrink.methods.options import MethodOptions
from moeshrink.plan import LayerPlan, NewExpert
from moeshrink.surgery import apply_layer_plan
from moeshrink.surgery.align import align_to_anchor
from moeshrink.surgery.reconstruct import cluster_targets, refit_down_projection

MAX_ALIGN_TOKENS = 4096
Align = Literal["weight", "activation", "none"]
Router = Literal["average", "anchor", "logsumexp"]


class MergeMethod(ExpertMethod):
    """Cluster the experts of a layer, then merge each cluster into one expert."""

    base_needs: frozenset[str] = frozenset({COUNTS})

    class Options(MethodOptions):
        """What every merging method takes; ``align`` given as null means the method's default."""

        align: Align = "weight"
        router: Router = "logsumexp"  # chosen on the validation split (docs/defaults.md)
        reconstruct: bool = True  # chosen on the validation split (docs/defaults.md)
        ridge: float = Field(1e-2, ge=0, description="recorded only with reconstruct")

        @field_validator("align", mode="before")
        @classmethod
        def _default_align(cls, value: Any) -> Any:
            return cls.model_fields["align"].default if value in (None, "") else value

        def omitted(self) -> set[str]:
            return super().omitted() | (set() if self.reconstruct else {"ridge"})

    settings: Options

    def __init__(self, seed: int = 0, **options: Any):
        super().__init__(seed=seed, **options)
        needs = set(self.base_needs)
        if self.settings.align == "activation":
            needs.add(INPUTS)
        if self.settings.router == "logsumexp":
            needs.add(LOGITS)
        if self.settings.reconstruct:
            needs |= {INPUTS, LOGITS}
        self.needs = frozenset(needs)

    def compress(self, layer: MoELayer, stats: LayerStats | None, budget: LayerBudget) -> LayerPlan:
        """Merge, then (with ``reconstruct``) re-fit each merged expert's down projection by least squares."""
        plan = self.plan_layer(layer, stats, budget)
        self.apply_and_refit(layer, stats, plan)
        return plan

    def apply_and_refit(
        self, layer: MoELayer, stats: LayerStats | None, plan: LayerPlan, only: set[int] | None = None
    ) -> None:
        """Apply ``plan`` to ``layer``; with ``reconstruct``, refit the down projection of each merged
        expert (of those whose index is in ``only``, when given), recording the refit in ``plan``."""
        targets = (
            cluster_targets(layer, plan, stats.inputs, stats.logits) if self.settings.reconstruct else {}
        )
        if only is not None:
            targets = {i: t for i, t in targets.items() if i in only}
        apply_layer_plan(layer, plan)
        for i, target in targets.items():
            tensors = refit_down_projection(layer, i, stats.inputs, target, self.settings.ridge)
            plan.experts[i].refit = sorted(tensors)
            plan.refit_tensors.update({f"{i}.{name}": t.cpu() for name, t in tensors.items()})

    @abstractmethod
    def clusters(self, layer: MoELayer, stats: LayerStats, budget: LayerBudget) -> list[list[int]]:
        """``budget.keep`` disjoint clusters covering every expert of the layer."""

    def plan_layer(self, layer: MoELayer, stats: LayerStats | None, budget: LayerBudget) -> LayerPlan:
        clusters = self.clusters(layer, stats, budget)
        covered = sorted(j for c in clusters for j in c)
        if len(clusters) != budget.keep or covered != list(range(layer.num_experts)):
            raise AssertionError(
                f"{self.name}: clusters {clusters} do not partition the experts into {budget.keep}"
            )
        experts = [self.merge(layer, stats, c) for c in clusters]
        experts.sort(
            key=lambda e: e.sources[0]
        )  # new experts ordered by anchor: routing groups stay contiguous
        counts = stats.counts.tolist()
        return LayerPlan(
            layer=layer.index, num_experts_before=layer.num_experts, experts=experts, scores=counts
        )

    def merge(self, layer: MoELayer, stats: LayerStats, cluster: list[int]) -> NewExpert:
        """One new expert from ``cluster``: anchor first, aligned members, frequency weights, router row."""
        counts = stats.counts.double()
        members = sorted(cluster, key=lambda j: (-float(counts[j]), j))
        anchor = members[0]
        mass = counts[members]
        weights = (mass / mass.sum() if mass.sum() > 0 else torch.full_like(mass, 1 / len(members))).tolist()
        permutations = None
        align = self.settings.align
        if align != "none" and len(members) > 1:
            hidden = stats.inputs[:MAX_ALIGN_TOKENS] if align == "activation" else None
            perms = align_to_anchor(layer, anchor, members[1:], hidden=hidden, method=align)
            permutations = [None] + [perms[m] for m in members[1:]]
        return NewExpert(
            sources=members,
            weights=weights,
            permutations=permutations,
            router_weights=self.router_row(layer, stats, members, weights),
        )

    def router_row(
        self, layer: MoELayer, stats: LayerStats, members: list[int], weights: list[float]
    ) -> list[float]:
        if len(members) == 1:
            return [1.0]
        if self.settings.router == "average":
            return weights
        if self.settings.router == "anchor":
            return [1.0] + [0.0] * (len(members) - 1)
        return logit_space_coefficients(layer, stats.logits, members)


def logit_space_coefficients(
    layer: MoELayer, logits: torch.Tensor, members: list[int], mass: list[float] | None = None
) -> list[float]:
    """Coefficients c over the member rows with sum_j c_j * logit_j(x) ~ the cluster's total routing
    mass in logit space, by ridge-regularised least squares on the sampled calibration tokens.

    ``mass`` (non-negative, default all 1) weighs each member's probability in that total: EEP's
    router transfer gives the new expert ``sum_j mass_j * p_j(x)``."""
    member_logits = logits[:, members].double()
    _, index = layer.route(logits)
    routed = torch.isin(index, torch.tensor(members)).any(dim=1)
    if int(routed.sum()) >= 4 * len(members):
        member_logits = member_logits[routed]
    scale = torch.ones(len(members), dtype=torch.float64) if mass is None else torch.tensor(mass).double()
    if layer.probabilities is sigmoid_probabilities:
        total = (torch.sigmoid(member_logits) * scale).sum(1).clamp(1e-4, 1 - 1e-4)
        target = torch.log(total) - torch.log1p(-total)
    else:
        target = torch.logsumexp(member_logits + scale.log(), dim=1)
    gram = member_logits.T @ member_logits
    ridge = 1e-6 * gram.diagonal().mean() * torch.eye(len(members), dtype=gram.dtype)
    coefficients = torch.linalg.solve(gram + ridge, member_logits.T @ target)
    return coefficients.tolist()
