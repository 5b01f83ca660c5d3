"""UNCURL (Sarkar et al.): task-specific cluster-and-merge. On the task's calibration tokens each
expert has a router-logit profile; experts are compared by the cosine of their profiles
(O(E^2 T)), spectrally clustered into K clusters (O(E^3)), permutation-aligned to the cluster's
most-used member and averaged by activation frequency; the router row is the same combination of
the members' rows."""

from __future__ import annotations

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import COUNTS, LOGITS, LayerStats
from moeshrink.methods.base import LayerBudget
from moeshrink.methods.clustering import cosine_matrix, labels_to_clusters, per_group, spectral_clusters
from moeshrink.methods.merging import MergeMethod


class UNCURL(MergeMethod):
    name = "uncurl"
    base_needs = frozenset({COUNTS, LOGITS})

    def clusters(self, layer: MoELayer, stats: LayerStats, budget: LayerBudget) -> list[list[int]]:
        similarity = cosine_matrix(stats.logits.double().numpy())

        def cluster(experts: list[int], k: int) -> list[list[int]]:
            if k == len(experts):
                return [[j] for j in experts]
            affinity = (similarity[experts][:, experts] + 1) / 2
            labels = spectral_clusters(affinity, k, seed=self.seed * 1000 + layer.index)
            return labels_to_clusters(experts, labels)

        return per_group(layer.num_experts, budget.groups, budget.keep, cluster)
