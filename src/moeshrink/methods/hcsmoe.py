"""HC-SMoE (Chen et al.): each expert is described by its mean output over ALL calibration tokens
(routed to it or not); hierarchical clustering with average linkage on Euclidean distances (a real
dendrogram, cut into exactly K clusters — the published scripts silently ran k-means); members are
averaged by usage frequency. Published without neuron alignment, so ``align`` defaults to none.

Average linkage on these features tends to gather many experts into one cluster (7 to 9 of 16 on
the testbed), which averages unrelated experts; ``max_cluster_size`` caps the cluster size (the
agglomeration then never merges two clusters whose union would exceed it)."""

from __future__ import annotations

from typing import Any

from scipy.cluster.hierarchy import cut_tree, linkage

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import COUNTS, MEAN_OUTPUTS, LayerStats
from moeshrink.errors import MoeShrinkError
from moeshrink.methods.base import LayerBudget
from moeshrink.methods.clustering import capped_average_linkage, labels_to_clusters, per_group
from moeshrink.methods.merging import MergeMethod


class HCSMoE(MergeMethod):
    name = "hcsmoe"
    base_needs = frozenset({COUNTS, MEAN_OUTPUTS})
    default_align = "none"

    def __init__(self, max_cluster_size: int | None = None, **options: Any):
        super().__init__(**options)
        if max_cluster_size is not None and int(max_cluster_size) < 1:
            raise MoeShrinkError(f"max_cluster_size must be at least 1, got {max_cluster_size}")
        self.max_cluster_size = None if max_cluster_size is None else int(max_cluster_size)

    @property
    def options(self) -> dict[str, Any]:
        return super().options | {"max_cluster_size": self.max_cluster_size}

    def clusters(self, layer: MoELayer, stats: LayerStats, budget: LayerBudget) -> list[list[int]]:
        features = stats.mean_outputs().numpy()

        def cluster(experts: list[int], k: int) -> list[list[int]]:
            if k == len(experts):
                return [[j] for j in experts]
            if self.max_cluster_size is not None:
                try:
                    labels = capped_average_linkage(features[experts], k, self.max_cluster_size)
                except ValueError as e:
                    raise MoeShrinkError(f"hcsmoe: {e}; raise max_cluster_size or keep more experts") from e
            else:
                tree = linkage(features[experts], method="average", metric="euclidean")
                labels = cut_tree(tree, n_clusters=k).reshape(-1)
            return labels_to_clusters(experts, labels)

        return per_group(layer.num_experts, budget.groups, budget.keep, cluster)
