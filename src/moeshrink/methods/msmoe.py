"""M-SMoE (Li et al., "Merge, Then Compress"): the most-used experts are dominant; every other expert
joins the dominant expert whose router-logit profile over the calibration tokens is most similar
(cosine); members are permutation-aligned to the dominant one and averaged by usage frequency."""

from __future__ import annotations

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import COUNTS, LOGITS, LayerStats
from moeshrink.methods.base import LayerBudget, top_scores
from moeshrink.methods.clustering import cosine_matrix, per_group
from moeshrink.methods.merging import MergeMethod


class MSMoE(MergeMethod):
    name = "msmoe"
    base_needs = frozenset({COUNTS, LOGITS})

    def clusters(self, layer: MoELayer, stats: LayerStats, budget: LayerBudget) -> list[list[int]]:
        similarity = cosine_matrix(stats.logits.double().numpy())
        counts = stats.counts

        def cluster(experts: list[int], k: int) -> list[list[int]]:
            dominant = [experts[i] for i in top_scores(counts[experts], k)]
            groups = {d: [d] for d in dominant}
            for j in experts:
                if j not in groups:
                    best = max(dominant, key=lambda d: (similarity[j, d], -d))
                    groups[best].append(j)
            return list(groups.values())

        return per_group(layer.num_experts, budget.groups, budget.keep, cluster)
