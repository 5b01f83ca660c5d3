"""HC-SMoE (Chen et al.): each expert is described by its mean output over ALL calibration tokens
(routed to it or not); hierarchical clustering with average linkage on Euclidean distances (a real
dendrogram, cut into exactly K clusters — the published scripts silently ran k-means); members are
averaged by usage frequency. Published without neuron alignment, so ``align`` defaults to none."""

from __future__ import annotations

from scipy.cluster.hierarchy import cut_tree, linkage

from moeshrink.arch import MoELayer
from moeshrink.calib.observers import COUNTS, MEAN_OUTPUTS, LayerStats
from moeshrink.methods.base import LayerBudget
from moeshrink.methods.clustering import labels_to_clusters, per_group
from moeshrink.methods.merging import MergeMethod


class HCSMoE(MergeMethod):
    name = "hcsmoe"
    base_needs = frozenset({COUNTS, MEAN_OUTPUTS})
    default_align = "none"

    def clusters(self, layer: MoELayer, stats: LayerStats, budget: LayerBudget) -> list[list[int]]:
        features = stats.mean_outputs().numpy()

        def cluster(experts: list[int], k: int) -> list[list[int]]:
            if k == len(experts):
                return [[j] for j in experts]
            tree = linkage(features[experts], method="average", metric="euclidean")
            labels = cut_tree(tree, n_clusters=k).reshape(-1)
            return labels_to_clusters(experts, labels)

        return per_group(layer.num_experts, budget.groups, budget.keep, cluster)
