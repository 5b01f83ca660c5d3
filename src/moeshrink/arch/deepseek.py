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

DEEPSEEK_V3 = GroupedFamilyAdapter(
    model_type="deepseek_v3",
    moe_block="mlp",
    router="gate",
    scoring=sigmoid_grouped_topk,
    probabilities=sigmoid_probabilities,
    expert_count_keys=("n_routed_experts",),
    shared=("shared_experts",),
)

DEEPSEEK_V2 = GroupedFamilyAdapter(
    model_type="deepseek_v2",
    moe_block="mlp",
    router="gate",
    scoring=softmax_grouped_topk,
    probabilities=softmax_probabilities,
    expert_count_keys=("n_routed_experts",),
    shared=("shared_experts",),
)
