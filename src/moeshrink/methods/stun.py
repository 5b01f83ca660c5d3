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

Under a global budget (STUN's native, non-uniform setting) one threshold is shared by all layers:
the merges of every layer are taken in order of height until the total is met, never leaving a layer
with fewer than ``minimum`` experts. Statistics come from one pass over the calibration tokens (two
with a global budget), however many experts there are.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import COACTIVATION, COUNTS, ROUTER, LayerStats
from moeshrink.errors import MoeShrinkError
from moeshrink.methods.base import LayerBudget
from moeshrink.methods.clustering import per_group
from moeshrink.methods.merging import Align, MergeMethod, Router
from moeshrink.plan import NewExpert


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
                return {"reconstruct": False} | data | {"align": "none"}
            return data

        def omitted(self) -> set[str]:
            return super().omitted() | ({"threshold"} if self.threshold is None else set())

    settings: Options

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
