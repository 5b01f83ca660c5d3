"""STUN phase 1 (seed 001): experts pruned (or merged) by clustering router rows, with O(1) forward passes.

Experts whose router rows are close are chosen for the same tokens, so one can stand in for the
other. The distance between experts i and j is their router-row distance (scaled by its mean over
the layer), optionally minus ``coactivation`` times how often the router picks them for the same
token (co-activation count over sqrt(count_i * count_j), in [0, 1]; a negative weight treats
co-activated experts as complementary instead). Agglomerative clustering with complete linkage
merges two clusters only if every cross pair is under a threshold; cutting the dendrogram after the
``E - K`` lowest merges is that threshold, found exactly (no bisection), so a layer ends with exactly
``K`` clusters. Each cluster keeps one representative, the member whose weights are closest to the
centroid of the members' weights (``mode="representative"``), or the frequency-weighted average of
its aligned members (``mode="average"``). The representative keeps its own router row
(``router="anchor"``, as STUN's released code does): the removed members' rows were close to it, so
their tokens mostly go to it. ``router="logsumexp"`` instead gives it the cluster's whole routing mass.

Defaults were chosen on the testbed's validation split at 16 -> 8 (docs/defaults.md; they used to
be chosen on the test split): co-activation counts as *dissimilarity* (``coactivation=-1``): experts
the router picks together for the same token fill different top-k slots and complement each other
(STUN's released code has no co-activation term, ``coactivation=0``; as a similarity, ``+1``, it was
much worse); each cluster becomes the frequency-weighted average of its aligned members
(``mode="average"``: 1.066 against 1.087 for STUN's representative, perplexity ratio over all domain
pairs; up to 0.2.0 the default was ``representative``, which STUN's released code uses and which
block-FP8 checkpoints need, since averaging would re-quantize); the new expert keeps the anchor's
router row (``router="anchor"``; ``average`` was 0.1% better, inside the 1% a change must clear,
``logsumexp`` worse). In ``average`` mode the merged expert's down projection is refit to the
cluster's output on the calibration tokens (``reconstruct=True``, chosen on validation at 16 -> 12,
8 and 4: 1.426 against 1.567 over the three budgets, most of it at 16 -> 4; up to 0.2.0 it was off);
``representative`` mode keeps the representative's weights as they are (``reconstruct=False``
unless given), as STUN does and block-FP8 checkpoints need.

With ``selective=True`` (the default in average mode since issue #16, chosen on the validation splits
of both testbeds; STUN's expert-level phase as its paper describes it: clustering, then a
*selective reconstruction*; docs/stun_selective.md) each cluster is decided on its own: either
reconstructed (the merged expert of ``mode="average"``, with its down projection refit when
``reconstruct``) or kept as its closest expert (the ``representative`` with its own router row),
whichever reproduces the cluster's output on the calibration tokens better
(:func:`selective_errors`: reconstruction error plus decision-boundary error, each cluster's choice
taken with the rest of the layer as it was: a first-order expansion of the layer's error in the
per-cluster decisions, so no combination of decisions is searched and no extra forward pass is run).
The choices and the criterion values are recorded per layer in the plan (``details["selective"]``).

Under a global budget (STUN's native, non-uniform setting) one threshold is shared by all layers:
the merges of every layer are taken in order of height until the total is met, never leaving a layer
with fewer than ``minimum`` experts. Statistics come from one pass over the calibration tokens (two
with a global budget), however many experts there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import COACTIVATION, COUNTS, INPUTS, LOGITS, ROUTER, LayerStats
from moeshrink.errors import MoeShrinkError
from moeshrink.methods.base import LayerBudget
from moeshrink.methods.clustering import per_group
from moeshrink.methods.merging import Align, MergeMethod, Router
from moeshrink.plan import LayerPlan, NewExpert
from moeshrink.surgery.recover import snapshot


def expert_distances(layer: MoELayer, stats: LayerStats | None, coactivation: float) -> np.ndarray:
    """STUN's behavioural distance between the experts of ``layer``, ``[E, E]``, zero diagonal, >= 0."""
    rows = (stats.router if stats is not None and stats.router is not None else layer.router.weight).detach()
    rows = rows.double().cpu()
    d = torch.cdist(rows, rows)
    off = ~torch.eye(len(rows), dtype=torch.bool)
    scale = d[off].mean() if len(rows) > 1 else torch.tensor(1.0, dtype=torch.float64)
    d = d / scale if scale > 0 else d
    if coactivation and stats is not None and stats.coactivation is not None:
        counts = stats.counts.double().cpu()
        norm = torch.sqrt(counts[:, None] * counts[None, :])
        together = torch.where(norm > 0, stats.coactivation.double().cpu() / norm.clamp_min(1e-12), 0.0)
        d = d - coactivation * together
    d = d - d[off].min().clamp(max=0.0) if len(rows) > 1 else d  # complete linkage ignores a shift
    d.fill_diagonal_(0.0)
    return d.numpy()


def complete_linkage(distances: np.ndarray) -> np.ndarray:
    """SciPy linkage matrix (merges in order of height) of complete-linkage clustering."""
    return linkage(squareform(distances, checks=False), method="complete")


def cut_after(merges: np.ndarray, n: int, k: int) -> list[list[int]]:
    """The ``k`` clusters left after the first ``n - k`` merges of ``merges`` (a SciPy linkage of ``n``
    points): the complete-linkage threshold cut, exact even when heights tie."""
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    for step in range(n - k):
        a, b = int(merges[step, 0]), int(merges[step, 1])
        members[n + step] = members.pop(a) + members.pop(b)
    return sorted(sorted(c) for c in members.values())


@dataclass
class Candidate:
    """What one option of a cluster would do on the calibration tokens: sums of squared errors against
    the cluster's original output ``y(x) = sum_{j in C} g_j(x) E_j(x)``."""

    error: float  # sum_x || y(x) - g'(x) E'(x) ||^2, the criterion
    reconstruction: float  # sum_x || y(x) - G(x) E'(x) ||^2: the expert, at the cluster's original gate
    boundary: float  # sum_x || (G(x) - g'(x)) E'(x) ||^2: the gate, moved by the new router row

    def record(self, scale: float) -> dict[str, float]:
        """Relative to the cluster's output energy ``sum_x ||y(x)||^2`` (``scale``)."""
        return {
            k: round(v / scale, 6)
            for k, v in (
                ("error", self.error),
                ("reconstruction", self.reconstruction),
                ("boundary", self.boundary),
            )
        }


@torch.no_grad()
def selective_errors(
    layer: MoELayer,
    inputs: torch.Tensor,
    logits: torch.Tensor,
    members: list[int],
    options: list[tuple[NewExpert, Any]],
) -> tuple[list[Candidate], float]:
    """STUN's selective-reconstruction criterion for one cluster ``members`` of ``layer`` (original weights).

    Each option is a new expert standing for the cluster and a function giving its (ungated) output
    on hidden states. Its gate ``g'(x)`` is what the layer's own routing rule gives it when its router
    row (``router_weights`` over ``sources``, applied to the logits) replaces the members' rows and
    every other expert is left as it was; its error is ``sum_x || y(x) - g'(x) E'(x) ||^2`` over the
    calibration tokens routed to the cluster before or to the new expert after. Returns the options'
    candidates and the cluster's output energy ``sum_x || y(x) ||^2``.
    """
    device = layer.router.weight.device
    logits = logits.to(device).float()
    weights, index = layer.route(logits)
    member_index = torch.tensor(members, device=device)
    hit = torch.isin(index, member_index)
    gate = (weights.double() * hit).sum(1)  # G(x)
    new_gates, touched = [], hit.any(1)
    for expert, _ in options:
        col = expert.sources[0]
        coefficients = torch.tensor(expert.router_weights, dtype=torch.float64, device=device)
        shifted = logits.clone()
        shifted[:, col] = (logits[:, expert.sources].double() @ coefficients).float()
        allowed = torch.ones(logits.shape[1], dtype=torch.bool, device=device)
        allowed[member_index] = False
        allowed[col] = True
        w, i = layer.route(shifted, allowed)
        chosen = i == col
        new_gates.append((w.double() * chosen).sum(1))
        touched |= chosen.any(1)
    tokens = touched.nonzero().squeeze(1)
    x = inputs.to(device)[tokens].to(layer.router.weight.dtype)
    target = torch.zeros(tokens.numel(), x.shape[1], dtype=torch.float64, device=device)
    for slot in range(index.shape[1]):
        rows = hit[tokens, slot].nonzero().squeeze(1)
        if rows.numel():
            out = layer.expert_outputs(x[rows], index[tokens[rows], slot]).double()
            target[rows] += weights[tokens[rows], slot].double()[:, None] * out
    gate, scale = gate[tokens], float(target.pow(2).sum())
    candidates = []
    for (_, outputs), new_gate in zip(options, new_gates, strict=True):
        new_gate = new_gate[tokens]
        out = outputs(x).double()
        candidates.append(
            Candidate(
                error=float((target - new_gate[:, None] * out).pow(2).sum()),
                reconstruction=float((target - gate[:, None] * out).pow(2).sum()),
                boundary=float(((gate - new_gate)[:, None] * out).pow(2).sum()),
            )
        )
    return candidates, scale


class STUN(MergeMethod):
    """Cluster experts by router rows and co-activation (complete linkage); keep one per cluster."""

    name = "stun"
    base_needs = frozenset({COUNTS, COACTIVATION})
    global_needs = frozenset(
        {COUNTS, COACTIVATION, ROUTER}
    )  # router rows: the layers may be gone (streaming)

    class Options(MergeMethod.Options):
        """STUN's defaults differ from the other merging methods' (see the module docstring)."""

        align: Align = Field("weight", description="none in representative mode: nothing is averaged")
        router: Router = "anchor"  # chosen on validation (docs/defaults.md)
        reconstruct: bool = True  # in average mode; chosen on validation (docs/defaults.md)
        mode: Literal["representative", "average"] = "average"  # chosen on validation (docs/defaults.md)
        coactivation: float = -1.0  # chosen on validation (docs/defaults.md)
        selective: bool = Field(  # chosen on both testbeds' validation (docs/stun_selective.md)
            True,
            description="per cluster, reconstruct (average mode's merged expert) or keep the closest "
            "expert as it is, whichever reproduces the cluster's calibration output better",
        )
        kept: Literal["closest", "most_used"] = Field(
            "closest",
            description="with selective: the expert a kept cluster keeps, the member closest to the "
            "centroid (STUN) or the most used member",
        )
        threshold: float | None = Field(None, description="found under a global budget")

        found: ClassVar[frozenset[str]] = frozenset({"threshold"})

        @model_validator(mode="before")
        @classmethod
        def _representative_aligns_nothing(cls, data: Any) -> Any:
            if (
                isinstance(data, dict)
                and data.get("mode", cls.model_fields["mode"].default) == "representative"
            ):
                # nothing is averaged, so nothing to align; the representative's weights stay its own
                return {"reconstruct": False, "selective": False} | data | {"align": "none"}
            return data

        @model_validator(mode="after")
        def _selective_needs_average(self) -> STUN.Options:
            if self.selective and self.mode != "average":
                raise ValueError(
                    "selective=true chooses per cluster between the closest expert and the averaged, "
                    "reconstructed one: it needs mode=average (drop mode=representative)"
                )
            if self.kept != "closest" and not self.selective:
                raise ValueError("kept chooses what selective=true keeps: give selective=true, or drop kept")
            return self

        def omitted(self) -> set[str]:
            return (
                super().omitted()
                | ({"threshold"} if self.threshold is None else set())
                | (set() if self.selective else {"selective", "kept"})
            )

    settings: Options

    def __init__(self, seed: int = 0, **options: Any):
        super().__init__(seed=seed, **options)
        if self.settings.selective:
            self.needs = self.needs | {INPUTS, LOGITS}

    def clusters(self, layer: MoELayer, stats: LayerStats, budget: LayerBudget) -> list[list[int]]:
        distances = expert_distances(layer, stats, self.settings.coactivation)

        def cluster(experts: list[int], k: int) -> list[list[int]]:
            if k >= len(experts):
                return [[j] for j in experts]
            sub = distances[np.ix_(experts, experts)]
            return [[experts[i] for i in c] for c in cut_after(complete_linkage(sub), len(experts), k)]

        return per_group(layer.num_experts, budget.groups, budget.keep, cluster)

    def allocate_global(
        self, layers: dict[int, MoELayer], stats: dict[int, LayerStats], total: int, minimum: int, groups: int
    ) -> tuple[dict[int, int], STUN]:
        """One complete-linkage threshold for every layer: take the lowest merges of all layers until
        ``total`` experts remain, leaving each layer at least ``minimum``. Returns the counts and a copy
        of this method recording that threshold (``self`` is unchanged)."""
        if groups > 1:
            raise MoeShrinkError(
                "stun with a global budget cuts each layer at one shared threshold, which cannot keep whole "
                "routing groups (DeepSeek n_group > 1): use a uniform budget (drop --global-budget)"
            )
        counts = {i: layer.num_experts for i, layer in layers.items()}
        if not sum(minimum for _ in layers) <= total < sum(counts.values()):
            raise MoeShrinkError(
                f"a global budget of {total} experts must lie in [{minimum * len(layers)}, {sum(counts.values())}) "
                f"for {len(layers)} MoE layers keeping at least {minimum} each"
            )
        candidates = []
        for i, layer in layers.items():
            heights = complete_linkage(expert_distances(layer, stats[i], self.settings.coactivation))[:, 2]
            candidates += [(float(h), i, step) for step, h in enumerate(heights[: counts[i] - minimum])]
        candidates.sort()
        taken = candidates[: sum(counts.values()) - total]
        for _, i, _ in taken:
            counts[i] -= 1
        return counts, self.with_options(threshold=taken[-1][0] if taken else None)

    def merge(self, layer: MoELayer, stats: LayerStats, cluster: list[int]) -> NewExpert:
        if self.settings.mode == "average" or len(cluster) == 1:
            return super().merge(layer, stats, cluster)
        return self.representative(layer, stats, cluster)

    def representative(self, layer: MoELayer, stats: LayerStats, cluster: list[int]) -> NewExpert:
        """The member closest to the centroid of the cluster's weights, as it is, with its own router row
        (STUN's released code; ties to the most used member)."""
        squared = torch.zeros(len(cluster), dtype=torch.float64)
        for spec in layer.expert_tensors:
            weights = layer.param(spec.name).detach()[cluster].double().cpu().flatten(1)
            squared += (weights - weights.mean(0)).pow(2).sum(1)
        distance = squared.sqrt()
        counts = stats.counts.double().cpu()
        tolerance = 1e-9 * float(distance.max().clamp_min(1e-30))
        near = [
            j
            for j, dist in zip(cluster, distance.tolist(), strict=True)
            if dist <= float(distance.min()) + tolerance
        ]
        representative = min(near, key=lambda j: (-float(counts[j]), j))  # ties (e.g. pairs) to the most used
        members = [representative] + [j for j in cluster if j != representative]
        weights = [1.0] + [0.0] * (len(members) - 1)
        return NewExpert(
            sources=members,
            weights=weights,
            router_weights=self.router_row(layer, stats, members, weights),
        )

    def compress(self, layer: MoELayer, stats: LayerStats | None, budget: LayerBudget) -> LayerPlan:
        """Without ``selective`` as every merging method; with it, each cluster reconstructed or kept as
        its closest expert by :func:`selective_errors`, the choices recorded in ``details``."""
        if not self.settings.selective:
            return super().compress(layer, stats, budget)
        merged = self.plan_layer(layer, stats, budget)  # every cluster reconstructed (average mode)
        trial = snapshot(layer)  # the reconstructed experts' outputs are measured on a copy
        self.apply_and_refit(trial, stats, merged.model_copy(deep=True))
        experts, rebuilt, record = [], set(), []
        for i, expert in enumerate(merged.experts):
            if len(expert.sources) == 1:
                experts.append(expert)
                continue
            closest = (
                self.representative(layer, stats, expert.sources)
                if self.settings.kept == "closest"
                else NewExpert(  # the anchor (most used member) alone, its own router row
                    sources=expert.sources,
                    weights=[1.0] + [0.0] * (len(expert.sources) - 1),
                    router_weights=[1.0] + [0.0] * (len(expert.sources) - 1),
                )
            )
            (keep, rebuild), scale = selective_errors(
                layer,
                stats.inputs,
                stats.logits,
                expert.sources,
                [
                    (closest, lambda x, j=closest.sources[0]: _outputs(layer, x, j)),
                    (expert, lambda x, j=i: _outputs(trial, x, j)),
                ],
            )
            reconstructed = rebuild.error <= keep.error
            experts.append(expert if reconstructed else closest)
            if reconstructed:
                rebuilt.add(expert.sources[0])
            scale = max(scale, 1e-30)
            record.append(
                {
                    "sources": sorted(expert.sources),
                    "choice": "reconstruct" if reconstructed else "keep",
                    "closest": closest.sources[0],
                    "keep": keep.record(scale),
                    "reconstruct": rebuild.record(scale),
                }
            )
        experts.sort(key=lambda e: e.sources[0])
        plan = LayerPlan(
            layer=layer.index,
            num_experts_before=layer.num_experts,
            experts=experts,
            scores=merged.scores,
            details={"selective": record},
        )
        self.apply_and_refit(
            layer, stats, plan, only={i for i, e in enumerate(experts) if e.sources[0] in rebuilt}
        )
        return plan


def _outputs(layer: MoELayer, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s (ungated) output on every row of ``hidden``."""
    index = torch.full((hidden.shape[0],), expert, dtype=torch.long, device=hidden.device)
    return layer.expert_outputs(hidden, index)
