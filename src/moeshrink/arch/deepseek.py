"""DeepSeek-V2 and -V3: grouped routing, shared experts, leading dense layers.

V3 scores with a sigmoid plus ``e_score_correction_bias``, picks the best ``topk_group`` of
``n_group`` groups, renormalises and multiplies by ``routed_scaling_factor``; V2 uses softmax and
(optionally) group-limited greedy selection. Layers before ``first_k_dense_replace`` are dense and
have no ``experts``; the adapter skips them.
"""

from moeshrink.arch.adapter import GroupedFamilyAdapter
from moeshrink.arch.routing import (
    sigmoid_grouped_topk,
    sigmoid_probabilities,
    softmax_grouped_topk,
    softmax_probabilities,
)


def _deepseek(model_type: str, scoring, probabilities) -> GroupedFamilyAdapter:
    """V2 and V3 differ only in their scoring rule."""
    return GroupedFamilyAdapter(
        model_type=model_type,
        moe_block="mlp",
        router="gate",
        scoring=scoring,
        probabilities=probabilities,
        expert_count_keys=("n_routed_experts",),
        shared=("shared_experts",),
    )


DEEPSEEK_V3 = _deepseek("deepseek_v3", sigmoid_grouped_topk, sigmoid_probabilities)
DEEPSEEK_V2 = _deepseek("deepseek_v2", softmax_grouped_topk, softmax_probabilities)
