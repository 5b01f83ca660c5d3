"""Qwen2-MoE (shared expert with its sigmoid gate) and Qwen3-MoE.

Qwen2-MoE renormalises top-k weights only with ``norm_topk_prob``. Qwen3-MoE's config aliases
``num_experts`` and ``num_local_experts``; transformers 5 writes only the latter, and stacks built on
transformers 4.x read ``num_experts`` (default 128), so both are written.
"""

from moeshrink.arch.adapter import FamilyAdapter
from moeshrink.arch.routing import softmax_probabilities, softmax_topk

QWEN2_MOE = FamilyAdapter(
    model_type="qwen2_moe",
    moe_block="mlp",
    router="gate",
    scoring=softmax_topk,
    probabilities=softmax_probabilities,
    expert_count_keys=("num_experts",),
    shared=("shared_expert", "shared_expert_gate"),
)

QWEN3_MOE = FamilyAdapter(
    model_type="qwen3_moe",
    moe_block="mlp",
    router="gate",
    scoring=softmax_topk,
    probabilities=softmax_probabilities,
    expert_count_keys=("num_experts", "num_local_experts"),
)
