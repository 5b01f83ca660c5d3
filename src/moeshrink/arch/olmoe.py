"""OLMoE: softmax -> top-k (renormalised only with ``norm_topk_prob``); both expert-count aliases written."""

from moeshrink.arch.adapter import FamilyAdapter
from moeshrink.arch.routing import softmax_probabilities, softmax_topk

ADAPTER = FamilyAdapter(
    model_type="olmoe",
    moe_block="mlp",
    router="gate",
    scoring=softmax_topk,
    probabilities=softmax_probabilities,
    expert_count_keys=("num_experts", "num_local_experts"),
)
