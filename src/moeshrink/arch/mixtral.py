"""Mixtral: softmax -> top-k -> renormalise; ``num_local_experts``."""

from moeshrink.arch.adapter import FamilyAdapter
from moeshrink.arch.routing import softmax_probabilities, softmax_topk

ADAPTER = FamilyAdapter(
    model_type="mixtral",
    moe_block="mlp",
    router="gate",
    scoring=softmax_topk,
    probabilities=softmax_probabilities,
    expert_count_keys=("num_local_experts",),
)
